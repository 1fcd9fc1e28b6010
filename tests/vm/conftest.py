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

from netns import Topology  # noqa: E402


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A node namespace with two clients (c1 on the node's network, c2 outside)."""
    t = Topology()
    try:
        t.create_node()
        t.add_client("c1", "192.168.100.2", "192.168.100.1")
        t.add_client("c2", "198.51.100.2", "198.51.100.1")
        yield t
    finally:
        t.close()
