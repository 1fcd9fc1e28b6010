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
