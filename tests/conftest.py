"""Test tiers: unit/ (no privileges), host/ (root, netns, real iptables), and
vm/ (real IPVS; only collected inside the virtme-ng guest, which
tests/host/test_vm_tier.py boots)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

collect_ignore = [] if os.environ.get("SVCPROXY_IN_VM") else ["vm"]


@pytest.fixture
def server() -> Iterator[Any]:
    """An in-process API server speaking the list/watch protocol (apiserver.py)."""
    from apiserver import FakeAPIServer

    s = FakeAPIServer()
    try:
        yield s
    finally:
        s.close()
