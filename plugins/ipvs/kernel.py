"""The IPVS datapath's door to the kernel, in the host or in a network
namespace: the IPVS netlink socket, the kube-ipvs0 dummy link (pyroute2) and
its addresses (`ip -batch`), sysctls, ipset and conntrack."""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from svcproxy.plugins.iptables.kernel import conntrack_delete, in_netns, run_tool

from .netlink import IPVSNetlink

DUMMY = "kube-ipvs0"
T = TypeVar("T")


def opened_in(netns: str | None, factory: Callable[[], T]) -> T:
    with in_netns(netns):
        return factory()


class IpvsKernel:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.nl = opened_in(netns, IPVSNetlink)
        self._ipr: Any = None

    def close(self) -> None:
        self.nl.close()
        if self._ipr is not None:
            self._ipr.close()

    # -- links and addresses (pyroute2) ---------------------------------------------------

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            # opened with this thread inside the namespace, so the socket lives
            # there; pyroute2's NetNS would start a helper process instead
            # (seconds each under emulation)
            self._ipr = opened_in(self.netns, IPRoute)
        return self._ipr

    def dummy_index(self, create: bool = True) -> int | None:
        found = self.ipr.link_lookup(ifname=DUMMY)
        if found:
            return int(found[0])
        if not create:
            return None
        # created DOWN, as kube-proxy does: the addresses are local all the same
        self.ipr.link("add", ifname=DUMMY, kind="dummy")
        return int(self.ipr.link_lookup(ifname=DUMMY)[0])

    def bound_addresses(self) -> set[str]:
        index = self.dummy_index(create=False)
        if index is None:
            return set()
        return {a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(index=index)}

    def start_address_changes(self, add: Sequence[str], remove: Sequence[str]
                              ) -> subprocess.Popen[bytes] | None:
        """Add and remove kube-ipvs0 addresses (full-length prefixes) with one
        `ip -batch` that runs in the background while the caller goes on (the
        IPVS batch does not depend on them); `finish_address_changes` waits.
        One netlink request per address through pyroute2's namespace proxy took
        ~50 ms each under emulation, and adding many /32s to one device is
        quadratic in the kernel: worth overlapping."""
        if add:
            self.dummy_index()
        elif not remove or self.dummy_index(create=False) is None:
            return None
        lines = [f"address add {a}/{ipaddress.ip_address(a).max_prefixlen} dev {DUMMY}"
                 for a in add]
        lines += [f"address del {a}/{ipaddress.ip_address(a).max_prefixlen} dev {DUMMY}"
                  for a in remove]
        # from a file, not a pipe: writing to a pipe would wait for ip to read
        with tempfile.TemporaryFile("w+") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            f.seek(0)
            # -force: keep going past "exists"/"not there" (already as wanted)
            return subprocess.Popen(
                [*(["ip", "netns", "exec", self.netns] if self.netns else []),
                 "ip", "-force", "-batch", "-"], stdin=f, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)

    @staticmethod
    def finish_address_changes(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None:
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def delete_dummy(self) -> bool:
        index = self.dummy_index(create=False)
        if index is None:
            return False
        self.ipr.link("del", index=index)
        return True

    # -- tools ----------------------------------------------------------------------------

    def _run(self, args: list[str], check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_tool(args, self.netns, stdin=stdin, check=check, timeout=300)

    # -- conntrack -----------------------------------------------------------------------

    def conntrack_delete(self, args: list[str], family: int = 4) -> int:
        return conntrack_delete(args, family, self.netns)
