"""Test tiers: unit/ (no privileges), host/ (root, netns, real iptables), and
vm/ (real IPVS; only collected inside the virtme-ng guest, which
tests/host/test_vm_tier.py boots)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

collect_ignore = [] if os.environ.get("SVCPROXY_IN_VM") else ["vm"]


def _host_nft_tables() -> set[str]:
    """The kube-proxy tables of this machine's own network namespace (inside
    the VM, whose namespaces are all throwaway, none are looked at)."""
    if shutil.which("nft") is None or os.environ.get("SVCPROXY_IN_VM"):
        return set()
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                         timeout=30).stdout
    return {line.split()[1] for line in out.splitlines()
            if line.startswith("table ") and line.endswith(" kube-proxy")}


@pytest.fixture(autouse=True)
def _host_nftables_untouched() -> Iterator[None]:
    """Tests program namespaces they make, never the test machine's own
    netns: a kube-proxy table that appears there is removed and fails the
    test (a config that forgot a datapath's netns option). Every tier: a unit
    test that runs `svcproxy run` reaches the kernel if a datapath is usable."""
    before = _host_nft_tables()
    yield
    new = _host_nft_tables() - before
    for family in sorted(new):
        subprocess.run(["nft", "delete", "table", family, "kube-proxy"],
                       capture_output=True, timeout=30)
    if new:
        pytest.fail(f"the test programmed this machine's own network namespace: table(s) "
                    f"{', '.join(f'{f} kube-proxy' for f in sorted(new))} (removed)")


@pytest.fixture
def server() -> Iterator[Any]:
    """An in-process API server speaking the list/watch protocol (apiserver.py)."""
    from apiserver import FakeAPIServer

    s = FakeAPIServer()
    try:
        yield s
    finally:
        s.close()
