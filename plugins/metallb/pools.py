"""MetalLB's IPAddressPool (metallb.io/v1beta1), as the metallb plugin reads it:
the addresses MetalLB may assign. The plugin asks the sources to watch them
(svcproxy_watch_kinds); the core knows nothing of MetalLB."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from svcproxy.datapath import WatchedKind
from svcproxy.model import _Reader


@dataclass(frozen=True)
class IPAddressPool:
    """MetalLB's IPAddressPool (metallb.io/v1beta1): the addresses it may assign,
    as CIDRs or "first-last" ranges. svcproxy only checks LoadBalancer IPs
    against them (the metallb plugin)."""

    namespace: str
    name: str
    #: (first, last) as integers with the IP version
    ranges: tuple[tuple[int, int, int], ...] = ()
    resource_version: str = field(default="", compare=False)

    kind = "IPAddressPool"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def contains(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(v == ip.version and lo <= int(ip) <= hi for v, lo, hi in self.ranges)


def parse_ip_address_pool(obj: Any) -> IPAddressPool:
    r = _Reader("IPAddressPool", obj)
    spec = r.mapping(obj, "spec", "spec")
    ranges = []
    for i, value in enumerate(r.seq(spec, "addresses", "spec.addresses")):
        path = f"spec.addresses[{i}]"
        if not isinstance(value, str):
            raise r.error(path, value, "must be a CIDR or a first-last range")
        try:
            if "-" in value:
                first, last = (ipaddress.ip_address(v.strip()) for v in value.split("-", 1))
                if first.version != last.version or int(first) > int(last):
                    raise ValueError(value)
                ranges.append((first.version, int(first), int(last)))
            else:
                net = ipaddress.ip_network(value.strip(), strict=False)
                ranges.append((net.version, int(net.network_address),
                               int(net.broadcast_address)))
        except ValueError:
            raise r.error(path, value, "must be a CIDR or a first-last range") from None
    return IPAddressPool(namespace=r.namespace, name=r.name, ranges=tuple(ranges),
                         resource_version=str(r.meta.get("resourceVersion") or ""))


POOLS = WatchedKind(kind="IPAddressPool", group="metallb.io", version="v1beta1",
                    plural="ipaddresspools", parse=parse_ip_address_pool)
