"""Network namespaces: run a block of code, or open a socket, with the calling
thread inside one (tests, benchmarks and the demo use a namespace as the
"node"; in production svcproxy runs in the host's). pyroute2 has netns helpers
too, but they fork a process per namespace; setns on the calling thread is
what every door here needs (a socket opened inside stays bound to it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the block with this thread in network namespace `netns` (sockets
    created inside stay bound to it). Entering and leaving are both checked: a
    thread that could not return must not go on working in the wrong namespace."""
    if not netns:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as current, open(f"/run/netns/{netns}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(current.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back out of {netns}: {os.strerror(err)}")


def read_proc(path: str, netns: str | None = None) -> str | None:
    """A /proc file as the network namespace `netns` sees it (use
    /proc/thread-self/net/..., not /proc/net: that one follows the main thread's
    namespace); None if it does not exist."""
    with in_netns(netns):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None


def opened_in(netns: str | None, factory: Callable[[], T]) -> T:
    """`factory()` called inside `netns` (a socket it opens stays there)."""
    with in_netns(netns):
        return factory()
