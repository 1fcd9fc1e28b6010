"""Boots the real Debian kernel (with IPVS) under qemu with virtme-ng once and
runs tests/vm inside it; passes only if the inner run passed. If the VM cannot
start, this fails with the reason (it is never silently skipped).

The VM is started in the background as soon as collection is done
(conftest.py, vm_tier.py) and this test, sorted last, waits for it."""

from __future__ import annotations

import vm_tier


def test_vm_tier() -> None:
    run = vm_tier.current
    if run is None:  # not started early (e.g. this test alone): start it now
        run = vm_tier.current = vm_tier.VmTier()
        run.start()
    code, summary, tail = run.wait()
    print(f"VM tier: {summary}\n{tail}")
    assert not run.error, run.error
    assert summary, f"the VM tier did not run (vng exit {code}):\n{tail}"
    assert code == 0, f"VM tests failed ({summary}):\n{tail}"
