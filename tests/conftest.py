"""Test tiers: unit/ (no privileges), host/ (root, netns, real iptables), and
vm/ (real IPVS; only collected inside the virtme-ng guest, which
tests/host/test_vm_tier.py boots)."""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("SVCPROXY_IN_VM") else ["vm"]
