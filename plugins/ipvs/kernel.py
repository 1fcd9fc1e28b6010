"""The doors the IPVS datapath uses, bundled for one network namespace: the
IPVS netlink socket, kube-ipvs0 and its addresses, and conntrack (the shape
IpvsState wants, doors.IpvsKernelDoors). Nothing here talks to the kernel
itself; each door is from the kernel library (svcproxy.plugins.kernel), and
tests swap in its fakes (fakes.FakeIpvsKernel).
"""

from __future__ import annotations

from svcproxy.plugins.kernel.conntrack import Conntrack
from svcproxy.plugins.kernel.ipvs import IPVSNetlink
from svcproxy.plugins.kernel.netns import opened_in
from svcproxy.plugins.kernel.rtnl import DUMMY, DummyLink

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
