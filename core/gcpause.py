"""Keeping Python's cyclic garbage collector off svcproxy's big, stable heap.

Reading a cluster (a manifest directory, the API server's lists) and syncing
it allocate hundreds of thousands of small objects, nearly all freed by
reference counting or kept for good (the cluster state, the plan). The
collector, triggered by those allocations, walked the whole growing heap over
and over: 40 % of `svcproxy plan` at 10,000 Services (3.0-3.5 s with it, 1.8-2.1
s without), and 30 % of planning in a sync. So the collector is paused while
they run (`gc_paused`).

Not gc.freeze() after the first sync: objects frozen in a reference cycle
are never collected, and a cycle holding a netlink socket then keeps its
network namespace (and the IPVS state in it) alive for good: with it, the VM
tier could no longer unload ip_vs after its tests' namespaces were deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: collection resumes after (when it
    was on before; several threads may use this at once: the first one in
    turns it off and back on)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's malloc_trim, if this is glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim).
    A full sync's transients (the transaction text, its netlink batch, the
    plan being compared) are freed after it but glibc keeps the pages: at
    10,000 Services tens of MB of RSS that nothing uses."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
