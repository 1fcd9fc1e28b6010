"""`pip install .` (not only -e) must ship every package under core/ and plugins/."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, base in mapping.items():
        for init in (ROOT / base).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / base).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_test_module_names_are_unique_across_tiers() -> None:
    """The tiers have no __init__.py: pytest imports test modules by basename,
    and two with the same name stop collection of the whole suite."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_the_vm_split_runs_every_vm_test_file_once() -> None:
    """tests/host/vm_tier.py splits tests/vm between two VMs: a new file not in
    the split would never run."""
    import re

    text = (ROOT / "tests" / "host" / "vm_tier.py").read_text()
    split = text[text.index("SPLIT"):text.index("OPT_IN")]
    opt_in = text[text.index("OPT_IN"):text.index("@dataclass")]
    listed = re.findall(r'"(tests/vm/test_[a-z_]+\.py)"', split)
    extra = re.findall(r'"(tests/vm/test_[a-z_]+\.py)"', opt_in)
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "vm").glob("test_*.py"))
    assert sorted(listed + extra) == found
    assert len(listed + extra) == len(set(listed + extra))
    # the file that unloads IPVS runs last in its VM
    assert listed[-1] == "tests/vm/test_zfallback_without_ipvs.py"
