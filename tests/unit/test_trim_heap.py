"""trim_heap (after full syncs) gives freed C-heap pages back: a full sync's
transients are freed, but glibc keeps pages with holes in the middle of the
heap unless asked."""

from __future__ import annotations

import pytest

from svcproxy.gcpause import _malloc_trim, trim_heap


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_freed_heap_holes_go_back_to_the_system() -> None:
    if _malloc_trim() is None:
        pytest.skip("not glibc")
    # 4 KB blocks (malloc, not Python's small-object arenas), every tenth kept,
    # so the freed ones are holes glibc does not return by itself
    blocks = [bytearray(4096) for _ in range(60_000)]
    keep = blocks[::10]
    del blocks
    before = _rss_kb()
    trim_heap()
    after = _rss_kb()
    assert before - after > 100_000, (before, after)  # most of ~220 MB freed
    assert len(keep) == 6000
