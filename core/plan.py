"""The planner: Services + EndpointSlices + this node -> ServiceMap.

The core decides what a Service means on this node once — which endpoints each
traffic policy selects (endpoints.py) — and asks the feature plugins for the
frontends (svcproxy_build_frontends) and their adjustments
(svcproxy_adjust_frontend). It has no switch on service types: a Service gets
a NodePort frontend only because the nodeport plugin builds one.

Planning is pure: it takes the previous ServiceMap and returns a new one plus the
delta, so a failed apply can simply keep the previous map.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import Config
from .endpoints import Categorized, categorize, endpoints_for_port
from .ir import (
    Backend,
    Frontend,
    FrontendKey,
    FrontendKind,
    PlanDelta,
    ServiceMap,
    ServiceSummary,
    ip_family,
)
from .layered import Editor
from .model import EndpointSlice, Node, Service, ServicePort

if TYPE_CHECKING:
    from .manager import PluginHost
    from .state import ClusterState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanContext:
    """What the planner knows about this node for one plan."""

    config: Config
    node_name: str
    node: Node | None = None
    #: every address of this node, per IP family (decides which addresses are
    #: already local and so need no binding)
    node_addresses: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    #: the node addresses NodePort frontends listen on, per IP family
    #: (node_addresses filtered by nodePortAddresses, loopback excluded)
    node_port_addresses: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    #: where plugins report problems with cluster objects (PluginHost.report_object)
    report: Callable[[str, str, str, str, str], None] | None = field(default=None,
                                                                    compare=False)

    @property
    def zone(self) -> str:
        return self.node.zone if self.node else ""

    def is_local_address(self, address: str) -> bool:
        fam = ip_family(address)
        return address in self.node_addresses.get(fam, ())


def node_port_addresses(addresses: Sequence[str], node: Node | None, setting: Sequence[str],
                        family: int) -> tuple[str, ...]:
    """Addresses NodePorts listen on, from nodePortAddresses as kube-proxy reads it:
    unset or "all" = every node address; "primary" = the node's first address of
    the family (its InternalIP); CIDRs = the addresses inside them. Loopback is
    never used (IPVS cannot serve NodePorts on it)."""
    fam = [a for a in addresses if ipaddress.ip_address(a).version == family
           and not ipaddress.ip_address(a).is_loopback]
    if not setting or list(setting) == ["all"]:
        return tuple(fam)
    if list(setting) == ["localhost"]:
        return ()
    if list(setting) == ["primary"]:
        if node is not None:
            for ip in node.ips():
                if ipaddress.ip_address(ip).version == family:
                    return (ip,)
        return tuple(fam[:1])
    nets = [ipaddress.ip_network(c) for c in setting]
    return tuple(a for a in fam
                 if any(ipaddress.ip_address(a) in n for n in nets if n.version == family))


def make_context(config: Config, node_name: str, node: Node | None,
                 host_addresses: Mapping[int, Sequence[str]] | None = None,
                 report: Callable[[str, str, str, str, str], None] | None = None
                 ) -> PlanContext:
    """Build the plan context. Node addresses come from `host_addresses` when given
    (`svcproxy run` asks the host), otherwise from the Node object's status."""
    node_ips = node.ips() if node else ()
    addresses: dict[int, tuple[str, ...]] = {}
    ports: dict[int, tuple[str, ...]] = {}
    for family in (4, 6):
        if host_addresses is not None and host_addresses.get(family) is not None:
            fam = tuple(host_addresses[family])
        else:
            fam = tuple(a for a in node_ips if ipaddress.ip_address(a).version == family)
        addresses[family] = fam
        ports[family] = node_port_addresses(
            fam, node, config.kube_proxy.effective_node_port_addresses, family)
    return PlanContext(config=config, node_name=node_name, node=node, node_addresses=addresses,
                       node_port_addresses=ports, report=report)


@dataclass(frozen=True)
class PortContext:
    """One service port in one IP family, with its endpoints already selected."""

    plan: PlanContext
    service: Service
    port: ServicePort
    family: int
    endpoints: Categorized

    @property
    def config(self) -> Config:
        return self.plan.config

    @property
    def cluster_ip(self) -> str | None:
        for ip in self.service.cluster_ips:
            if ip_family(ip) == self.family:
                return ip
        return None

    def warn(self, reason: str, message: str) -> None:
        """Report a problem with this port's Service (logged once, and a Warning
        Event on the Service when the Kubernetes source runs)."""
        if self.plan.report is not None:
            self.plan.report("Service", self.service.namespace, self.service.name, reason,
                             message)
        else:
            log.warning("Service %s: %s", self.service.key, message)

    @property
    def service_port_name(self) -> str:
        """kube-proxy's ServicePortName: "namespace/name:port" ("namespace/name" if unnamed)."""
        base = self.service.key
        return f"{base}:{self.port.name}" if self.port.name else base

    def in_family(self, address: str) -> bool:
        return ip_family(address) == self.family

    def backends_for(self, policy: str) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
        """(backends, cluster_backends) for a frontend with traffic policy `policy`."""
        if policy == "Local":
            fallback = self.endpoints.cluster if self.endpoints.uses_cluster else ()
            return self.endpoints.local, fallback
        return self.endpoints.cluster, ()

    def frontend(self, address: str, port: int, kind: FrontendKind, policy: str,
                 bind_address: bool = True, **extra: Any) -> Frontend:
        """A Frontend for this service port with kube-proxy's defaults: the configured
        scheduler, no affinity (the affinity plugin adds it), backends by `policy`."""
        backends, cluster_backends = self.backends_for(policy)
        return Frontend(address=address, port=port, protocol=self.port.protocol, kind=kind,
                        service=self.service_port_name, backends=backends,
                        traffic_policy=policy, cluster_backends=cluster_backends,
                        scheduler=self.config.kube_proxy.ipvs_scheduler,
                        bind_address=bind_address, any_endpoints=self.endpoints.has_any,
                        **extra)


def _summary(service: Service, ports: list[PortContext]) -> ServiceSummary:
    local_ready: set[tuple[str, int]] = set()
    no_local_int = no_local_ext = False
    for pc in ports:
        cat = pc.endpoints
        local_ready.update((b.address, b.port) for b in cat.local if b.ready)
        if cat.uses_local and cat.has_any and not cat.local:
            if service.internal_traffic_policy == "Local":
                no_local_int = True
            if service.external_traffic_policy == "Local" and service.externally_accessible:
                no_local_ext = True
    hc = service.health_check_node_port if (service.type == "LoadBalancer" and
                                            service.external_traffic_policy == "Local") else 0
    # Count endpoints, not endpoint ports, as kube-proxy's health server does.
    return ServiceSummary(service=service.key, health_check_node_port=hc,
                          local_ready_endpoints=len({a for a, _ in local_ready}),
                          no_local_endpoints_internal=no_local_int,
                          no_local_endpoints_external=no_local_ext)


def _node_ips(ctx: PlanContext
              ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The node's addresses, its NodePort addresses and its pod CIDRs."""
    return ((*ctx.node_addresses.get(4, ()), *ctx.node_addresses.get(6, ())),
            (*ctx.node_port_addresses.get(4, ()), *ctx.node_port_addresses.get(6, ())),
            tuple(ctx.node.pod_cidrs) if ctx.node is not None else ())


class Planner:
    """Turns cluster state into ServiceMaps through the plugins' frontend hooks."""

    def __init__(self, plugins: PluginHost) -> None:
        self.plugins = plugins

    def plan_service(self, ctx: PlanContext, service: Service,
                     slices: Iterable[EndpointSlice]) -> tuple[list[Frontend], ServiceSummary]:
        """Frontends of one Service (all ports, all families) and its summary."""
        slices = list(slices)
        uses_cluster = service.internal_traffic_policy != "Local" or service.externally_accessible
        uses_local = service.internal_traffic_policy == "Local" or (
            service.external_traffic_policy == "Local" and service.externally_accessible)
        prefer_node = ctx.config.kube_proxy.feature_gates.get("PreferSameTrafficDistribution",
                                                              True)
        ports: list[PortContext] = []
        frontends: list[Frontend] = []
        for ip in service.cluster_ips:
            family = ip_family(ip)
            for sp in service.ports:
                candidates = endpoints_for_port(slices, sp.name, sp.protocol, family,
                                                ctx.node_name)
                cat = categorize(candidates, uses_cluster=uses_cluster, uses_local=uses_local,
                                 node_name=ctx.node_name, zone=ctx.zone,
                                 prefer_same_node=prefer_node)
                pc = PortContext(plan=ctx, service=service, port=sp, family=family, endpoints=cat)
                ports.append(pc)
                for fe in self.plugins.build_frontends(pc):
                    frontends.append(self.plugins.adjust_frontend(fe, pc))
        return frontends, _summary(service, ports)

    def _plan_into(self, ctx: PlanContext, state: ClusterState, keys: Iterable[str],
                   frontends: MutableMapping[FrontendKey, Frontend],
                   by_service: MutableMapping[str, tuple[FrontendKey, ...]],
                   summaries: MutableMapping[str, ServiceSummary]) -> None:
        for key in sorted(keys):
            service = state.services.get(key)
            if service is None or service.ignore_reason is not None:
                continue
            fes, summary = self.plan_service(ctx, service, state.slices_for(key))
            owned: list[FrontendKey] = []
            for fe in fes:
                other = frontends.get(fe.key)
                if other is not None and other.service_key != key:
                    log.warning("%s: frontend %s is already used by %s; skipped", fe.service,
                                fe.key, other.service)
                    continue
                frontends[fe.key] = fe
                owned.append(fe.key)
            by_service[key] = tuple(owned)
            summaries[key] = summary

    def plan_full(self, ctx: PlanContext, state: ClusterState,
                  previous: ServiceMap) -> tuple[ServiceMap, PlanDelta]:
        """Plan every Service from scratch and diff against `previous`."""
        frontends: dict[FrontendKey, Frontend] = {}
        by_service: dict[str, tuple[FrontendKey, ...]] = {}
        summaries: dict[str, ServiceSummary] = {}
        self._plan_into(ctx, state, state.services.keys(), frontends, by_service, summaries)
        new = ServiceMap(frontends, summaries, by_service, *_node_ips(ctx))
        return new, new.diff(previous)

    def plan_partial(self, ctx: PlanContext, state: ClusterState, previous: ServiceMap,
                     dirty: Iterable[str]) -> tuple[ServiceMap, PlanDelta]:
        """Re-plan only the `dirty` Services on top of `previous`. The cost follows
        the number of changed Services, not the size of the cluster."""
        dirty = set(dirty)
        # on top of the previous plan's mappings, which stay as they are (they
        # are the applied plan if this sync fails): copying them was nearly all
        # of a one-endpoint re-plan at 10,000 Services
        frontends = Editor(previous.frontends)
        by_service = Editor(previous.by_service)
        summaries = Editor(previous.services)
        old: dict[FrontendKey, Frontend] = {}
        for key in dirty:
            for fk in by_service.pop(key, ()):
                old[fk] = frontends.pop(fk)
            summaries.pop(key, None)
        self._plan_into(ctx, state, dirty, frontends, by_service, summaries)
        new_keys = {fk for key in dirty for fk in by_service.get(key, ())}
        created = sorted(k for k in new_keys if k not in old)
        deleted = sorted(k for k in old if k not in new_keys)
        updated = sorted(k for k in new_keys if k in old and old[k] != frontends[k])
        backends = previous.backend_count() \
            - sum(len(f.backends) for f in old.values()) \
            + sum(len(frontends[k].backends) for k in new_keys)
        families = previous.families() | {ip_family(k.address) for k in new_keys}
        return (ServiceMap(frontends.finish(), summaries.finish(), by_service.finish(),
                           *_node_ips(ctx),
                           backend_total=backends, family_set=frozenset(families)),
                PlanDelta(tuple(created), tuple(updated), tuple(deleted)))
