"""Inside the VM: a real kernel with IPVS. Each test starts from an empty
IPVS table."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def clean_ipvs() -> Iterator[None]:
    subprocess.run(["ipvsadm", "-C"], check=True)
    yield
    subprocess.run(["ipvsadm", "-C"], check=True)


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# the host tier's namespace topology helpers work the same inside the VM
sys.path.insert(0, str(Path(__file__).parents[1] / "host"))
