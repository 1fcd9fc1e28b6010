"""The doors the IPVS datapath uses, bundled for one network namespace: the
IPVS netlink socket, kube-ipvs0 and its addresses, ipset, conntrack and the
tool runner. Nothing here talks to the kernel itself; each door is from the
kernel library (svcproxy.plugins.kernel), and tests swap in its fakes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from svcproxy.plugins.kernel.conntrack import Conntrack
from svcproxy.plugins.kernel.ipvs import IPVSNetlink
from svcproxy.plugins.kernel.netns import opened_in
from svcproxy.plugins.kernel.rtnl import DUMMY, AddressChanges, DummyLink
from svcproxy.plugins.kernel.tools import run_tool

__all__ = ["DUMMY", "IpvsKernel"]


class IpvsKernel:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._nl: IPVSNetlink | None = None
        self.link = DummyLink(netns)
        self.conntrack = Conntrack(netns)

    @property
    def nl(self) -> IPVSNetlink:
        """The IPVS generic-netlink socket, opened on first use (the helper sets
        and rules need none, and a kernel without IPVS has no family for it)."""
        if self._nl is None:
            self._nl = opened_in(self.netns, IPVSNetlink)
        return self._nl

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
        self.link.close()

    # -- kube-ipvs0 and its addresses ------------------------------------------------------

    def dummy_index(self, create: bool = True) -> int | None:
        return self.link.index(create)

    def bound_addresses(self) -> set[str]:
        return self.link.addresses()

    def all_addresses(self) -> list[tuple[int, str]]:
        return self.link.all_addresses()

    def start_address_changes(self, add: Sequence[str], remove: Sequence[str]
                              ) -> AddressChanges | None:
        return self.link.start_changes(add, remove)

    @staticmethod
    def finish_address_changes(changes: AddressChanges | None) -> list[str]:
        return DummyLink.finish_changes(changes)

    def delete_dummy(self) -> bool:
        return self.link.delete()

    # -- tools and conntrack ---------------------------------------------------------------

    def _run(self, args: list[str], check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_tool(args, self.netns, stdin=stdin, check=check, timeout=300)

    def conntrack_delete(self, args: list[str], family: int = 4) -> int:
        return self.conntrack.delete(args, family)
