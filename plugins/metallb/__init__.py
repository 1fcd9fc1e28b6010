"""Built-in plugin `metallb`: what MetalLB (L2 mode) needs from an IPVS node.

With `ipvs.strictARP: true` and the IPVS datapath active, the node stops
answering ARP for addresses that are not on the interface the request came in
on, and stops announcing them — otherwise every node answers for every
LoadBalancer IP bound to kube-ipvs0 and L2 ownership flaps (k/k#59976):
arp_ignore=1 and arp_announce=2.

- `arpScope: all` (default, as kube-proxy): on net.ipv4.conf.all, which every
  interface inherits. `arpScope: interfaces`: only on kube-ipvs0 and the
  node's uplinks (`interfaces`, default: every interface holding an IPv4
  address other than loopback and kube-ipvs0) — upstream's global setting broke
  CNIs with unnumbered veths (k/k#71555).
- The previous values are recorded (shared sysctl backup) and put back when
  strictARP is turned off (upstream never reverts, k/k#123992) and by
  `svcproxy cleanup`.

LoadBalancer ingress IPs themselves are handled as kube-proxy does by the
loadbalancer plugin and the IPVS datapath: bound to kube-ipvs0 unless already
local, `ipMode: Proxy` skipped.

With `watchIPAddressPools: true`, the plugin asks the sources for MetalLB's
IPAddressPools (metallb.io/v1beta1; svcproxy_watch_kinds, pools.py) and warns — log line and
Warning Event `LoadBalancerIPOutsidePools` on the Service — about
LoadBalancer IPs outside every pool (checked on full syncs and whenever a
pool changes).

Options: arpScope, interfaces, watchIPAddressPools, sysctlBackup, netns (tests).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from svcproxy import hookimpl
from svcproxy.bus import Event, EventType
from svcproxy.config import Config
from svcproxy.datapath import CheckItem, SyncResult, WatchedKind
from svcproxy.errors import PluginError
from svcproxy.ir import FrontendKind, ServiceMap
from svcproxy.plugins.kernel.sysctl import DEFAULT_BACKUP, SysctlStore
from svcproxy.plugins.kernel.tools import run_tool

from .pools import POOLS, IPAddressPool

log = logging.getLogger(__name__)

ARP = {"arp_ignore": "1", "arp_announce": "2"}
_ARP_NAME = re.compile(r"^net/ipv4/conf/[^/]+/arp_(ignore|announce)$")


def arp_names(interface: str) -> list[str]:
    return [f"net/ipv4/conf/{interface}/{k}" for k in ARP]


class MetallbPlugin:
    def __init__(self) -> None:
        self.config = Config()
        self.store = SysctlStore()
        self.explicit_backup = False
        self.scope = "all"
        self.interfaces: list[str] | None = None
        self.active = False
        self.ipvs0_covered = False
        self.host: Any = None
        #: MetalLB pools by namespace/name, once any was seen
        self.pools: dict[str, IPAddressPool] = {}
        self.pools_seen = False
        self.pools_changed = False
        self.watch_pools = False
        self.last_plan: ServiceMap | None = None

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config, options: Mapping[str, Any]) -> None:
        self.config = config
        known = {"arpScope", "interfaces", "sysctlBackup", "netns", "watchIPAddressPools"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PluginError(f"metallb: unknown option {unknown[0]!r} (options: "
                              f"{', '.join(sorted(known))})")
        scope = options.get("arpScope", "all")
        if scope not in ("all", "interfaces"):
            raise PluginError(f"metallb: arpScope must be all or interfaces (got {scope!r})")
        self.scope = scope
        ifaces = options.get("interfaces")
        if ifaces is not None and (not isinstance(ifaces, list) or
                                   not all(isinstance(i, str) and i for i in ifaces)):
            raise PluginError(f"metallb: interfaces must be a list of interface names "
                              f"(got {ifaces!r})")
        self.interfaces = ifaces
        self.watch_pools = bool(options.get("watchIPAddressPools", False))
        self.explicit_backup = "sysctlBackup" in options
        self.store = SysctlStore(str(options.get("sysctlBackup", DEFAULT_BACKUP)),
                                 options.get("netns"))

    def uplinks(self) -> list[str]:
        """Interfaces holding the node's IPv4 addresses (not lo, not kube-ipvs0)."""
        proc = run_tool(["ip", "-j", "-4", "addr", "show"], self.store.netns, check=False)
        try:
            links = json.loads(proc.stdout or "[]")
        except ValueError:
            return []
        return sorted({link["ifname"] for link in links
                       if link.get("ifname") not in ("lo", "kube-ipvs0")
                       and link.get("addr_info")})

    def scope_interfaces(self) -> list[str]:
        if self.scope == "all":
            return ["all"]
        names = list(self.interfaces) if self.interfaces is not None else self.uplinks()
        if self.store.read("net/ipv4/conf/kube-ipvs0/arp_ignore") is not None:
            names.append("kube-ipvs0")
        return sorted(set(names))

    @hookimpl
    def svcproxy_check(self, config: Config) -> list[CheckItem]:
        """strictARP as the kernel applies it, in the configured scope: an
        interface's effective arp_ignore / arp_announce is the larger of its
        own value and conf/all's."""
        strict = config.kube_proxy.ipvs.strict_arp
        loose = []
        shown = []
        for iface in self.scope_interfaces():
            values = {}
            for key in ARP:
                own = self.store.read(f"net/ipv4/conf/{iface}/{key}")
                every = self.store.read(f"net/ipv4/conf/all/{key}")
                values[key] = max(int(v) for v in (own, every, "0") if v and v.isdigit())
            shown.append(f"{iface}: arp_ignore={values['arp_ignore']}, "
                         f"arp_announce={values['arp_announce']}")
            if values["arp_ignore"] < 1 or values["arp_announce"] < 2:
                loose.append(iface)
        detail = f"{'; '.join(shown)} (arpScope {self.scope})"
        if strict and loose:
            fix = " ".join(f"net.ipv4.conf.{i}.arp_ignore=1 net.ipv4.conf.{i}.arp_announce=2"
                           for i in loose)
            return [CheckItem("strictARP", "warn", f"ipvs.strictARP is set but not in effect "
                              f"on {', '.join(loose)}: {detail} (svcproxy sets it when it "
                              f"runs with the ipvs datapath)", f"sysctl -w {fix}")]
        state = "strict" if not loose else "not strict"
        return [CheckItem("strictARP", "ok", f"{state}: {detail}; ipvs.strictARP "
                          f"{'on' if strict else 'off'}")]

    @hookimpl
    def svcproxy_watch_kinds(self) -> list[WatchedKind]:
        """MetalLB's pools, when asked to check LoadBalancer IPs against them."""
        return [POOLS] if self.watch_pools else []

    def recorded(self) -> list[str]:
        return [n for n in self.store.backup() if _ARP_NAME.match(n)]

    @hookimpl
    def svcproxy_start_proxy(self, config: Config, datapath: str, host: Any) -> None:
        self.host = host
        self.store.follow_datapath(config, datapath, self.explicit_backup)
        self.active = config.kube_proxy.ipvs.strict_arp and datapath == "ipvs"
        if self.active:
            self.apply()
        else:
            restored = self.store.restore(self.recorded())
            for line in restored:
                log.info("strictARP is off: %s", line)

    def apply(self) -> list[str]:
        """Set arp_ignore/arp_announce on the scope; returns the names written."""
        written = []
        for iface in self.scope_interfaces():
            for name, value in zip(arp_names(iface), ARP.values(), strict=True):
                if self.store.ensure_or_warn(name, value):
                    written.append(name)
        return written

    @hookimpl
    def svcproxy_prepare_node(self, config: Config, datapath: str) -> list[str] | None:
        """strictARP's sysctls, when it is on and IPVS will run."""
        if not (config.kube_proxy.ipvs.strict_arp and datapath == "ipvs"):
            return None
        self.store.follow_datapath(config, datapath, self.explicit_backup)
        return [f"sysctl {name.replace('/', '.')}" for name in self.apply()]

    @hookimpl
    def svcproxy_observe_event(self, event: Event) -> None:
        obj = event.object
        if not isinstance(obj, IPAddressPool):
            return
        if event.type == EventType.DELETED:
            self.pools.pop(obj.key, None)
        else:
            self.pools[obj.key] = obj
        self.pools_seen = True
        self.pools_changed = True
        if self.last_plan is not None:
            self.pools_changed = False
            self.check_pools(self.last_plan)

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        # kube-ipvs0 appears with the first IPVS sync: cover it once it exists
        if self.active and result.ok and self.scope == "interfaces" and \
                not self.ipvs0_covered:
            self.apply()
            self.ipvs0_covered = self.store.read("net/ipv4/conf/kube-ipvs0/arp_ignore") == "1"
        if result.ok and result.plan is not None:
            self.last_plan = result.plan
        if result.ok and result.plan is not None and self.pools_seen and (
                result.full or self.pools_changed):
            self.pools_changed = False
            self.check_pools(result.plan)

    def check_pools(self, plan: ServiceMap) -> list[str]:
        """LoadBalancer IPs outside every IPAddressPool, each reported on its Service."""
        outside = []
        names = ", ".join(sorted(self.pools)) or "none"
        for fe in plan.frontends.values():
            if fe.kind != FrontendKind.LOAD_BALANCER:
                continue
            if any(p.contains(fe.address) for p in self.pools.values()):
                continue
            outside.append(fe.address)
            ns, _, name = fe.service_key.partition("/")
            message = (f"LoadBalancer IP {fe.address} is outside every MetalLB IPAddressPool "
                       f"({names}): MetalLB will not announce it")
            if self.host is not None:
                self.host.report_object("Service", ns, name, "LoadBalancerIPOutsidePools",
                                        message)
            else:
                log.warning("Service %s: %s", fe.service_key, message)
        return outside

    @hookimpl
    def svcproxy_cleanup_datapath(self) -> list[str]:
        return self.store.restore(self.recorded())
