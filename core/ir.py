"""The datapath-neutral plan: what this node must forward, and nothing about how.

A `Frontend` is one address:port/protocol that clients connect to (a virtual
server in IPVS terms, a KUBE-SERVICES match in iptables terms) with the
`Backend`s it balances to. A `ServiceMap` is the whole desired state; `diff`
tells a datapath which frontends to create, update and delete. Datapaths see
only these types, never Services.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


def ip_family(address: str) -> int:
    """4 or 6 for an address already in canonical form (as the model stores them)."""
    return 6 if ":" in address else 4


class FrontendKind(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True)
class FrontendKey:
    """Identity of a frontend: what the kernel keys a virtual server by.

    Keys sort numerically: IPv4 before IPv6, then by address, port, protocol."""

    address: str
    port: int
    protocol: str

    @functools.cached_property
    def _sort(self) -> tuple[int, int, int, str]:
        # inet_pton, not ipaddress: every key of a full plan is sorted once, and
        # ipaddress's parser was a sixth of planning 10,000 services
        if ":" in self.address:
            version, packed = 6, socket.inet_pton(socket.AF_INET6, self.address)
        else:
            version, packed = 4, socket.inet_pton(socket.AF_INET, self.address)
        return version, int.from_bytes(packed, "big"), self.port, self.protocol

    def sort_key(self) -> tuple[int, int, int, str]:
        return self._sort

    def __lt__(self, other: FrontendKey) -> bool:
        return self._sort < other._sort

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint a frontend may send a connection to."""

    address: str
    port: int
    weight: int = 1
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    #: the endpoint runs on this node
    local: bool = False
    node_name: str = ""

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Frontend:
    """One address:port/protocol of a service port, and where it sends traffic."""

    address: str
    port: int
    protocol: str
    kind: FrontendKind
    #: owning service port, "namespace/name:port-name" ("namespace/name" if unnamed)
    service: str
    #: backends chosen by the frontend's traffic policy (kube-proxy's
    #: CategorizeEndpoints); empty when there is nothing to send to
    backends: tuple[Backend, ...] = ()
    #: "Cluster" or "Local": the policy that chose `backends`
    traffic_policy: str = "Cluster"
    #: for Local-policy frontends of a service that also uses cluster endpoints:
    #: the cluster-wide endpoints. Datapaths use them for traffic that must not be
    #: dropped when there is no local endpoint (IPVS falls back to them as kube-proxy
    #: does; iptables sends pod-originated traffic to them). Empty otherwise.
    cluster_backends: tuple[Backend, ...] = ()
    #: scheduler name (IPVS: rr, wrr, lc, sh, mh, ...); datapaths without
    #: schedulers ignore it
    scheduler: str = "rr"
    scheduler_flags: tuple[str, ...] = ()
    #: ClientIP session affinity in seconds; 0 = no affinity
    persistence_timeout: int = 0
    #: loadBalancerSourceRanges: only these client CIDRs may connect (empty = all)
    source_ranges: tuple[str, ...] = ()
    #: the address must be made local to the node (bound to kube-ipvs0 in IPVS
    #: mode); False for node addresses and addresses already local
    bind_address: bool = True
    #: the service port has usable endpoints somewhere in the cluster, even if
    #: none is selected here (kube-proxy's hasAnyEndpoints: decides between
    #: "no endpoints" (REJECT) and "no local endpoints" (DROP))
    any_endpoints: bool = False
    #: free-form settings plugins pass to datapaths, as sorted (key, value) pairs
    extras: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def key(self) -> FrontendKey:
        return FrontendKey(self.address, self.port, self.protocol)

    @property
    def family(self) -> int:
        return ip_family(self.address)

    @property
    def service_key(self) -> str:
        """The owning Service, "namespace/name"."""
        return self.service.split(":", 1)[0]

    def extra(self, name: str, default: str | None = None) -> str | None:
        return dict(self.extras).get(name, default)

    def with_extra(self, name: str, value: str) -> Frontend:
        extras = dict(self.extras)
        extras[name] = value
        return replace(self, extras=tuple(sorted(extras.items())))

    def to_json(self) -> dict[str, Any]:
        """The stable JSON shape documented in docs/plan-format.md."""
        return {
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "kind": str(self.kind),
            "service": self.service,
            "scheduler": self.scheduler,
            "scheduler_flags": list(self.scheduler_flags),
            "persistence_timeout": self.persistence_timeout,
            "traffic_policy": self.traffic_policy,
            "source_ranges": list(self.source_ranges),
            "bind_address": self.bind_address,
            "any_endpoints": self.any_endpoints,
            "backends": [_backend_json(b) for b in self.backends],
            "cluster_backends": [_backend_json(b) for b in self.cluster_backends],
        }


def _backend_json(b: Backend) -> dict[str, Any]:
    return {"address": b.address, "port": b.port, "weight": b.weight, "ready": b.ready,
            "serving": b.serving, "terminating": b.terminating, "local": b.local}


@dataclass(frozen=True)
class ServiceSummary:
    """Per-Service facts that are not about one frontend (health checks, metrics)."""

    service: str
    health_check_node_port: int = 0
    #: ready endpoints on this node (what the healthCheckNodePort server reports)
    local_ready_endpoints: int = 0
    #: Local policy, endpoints elsewhere, none here (kube-proxy's no_local_endpoints)
    no_local_endpoints_internal: bool = False
    no_local_endpoints_external: bool = False


@dataclass(frozen=True)
class PlanDelta:
    """What changed between two ServiceMaps, by frontend key."""

    created: tuple[FrontendKey, ...] = ()
    updated: tuple[FrontendKey, ...] = ()
    deleted: tuple[FrontendKey, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    @property
    def changed(self) -> frozenset[FrontendKey]:
        return frozenset(self.created) | frozenset(self.updated) | frozenset(self.deleted)

    def __len__(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


@dataclass(frozen=True)
class ServiceMap:
    """The complete desired state: every frontend by key, and per-Service summaries."""

    frontends: Mapping[FrontendKey, Frontend] = field(default_factory=dict)
    services: Mapping[str, ServiceSummary] = field(default_factory=dict)
    #: the frontend keys each Service ("namespace/name") owns, for partial re-plans
    by_service: Mapping[str, tuple[FrontendKey, ...]] = field(default_factory=dict)
    #: this node's addresses, primary first per family (datapaths need the node's
    #: primary IP, e.g. for LoadBalancer source ranges)
    node_ips: tuple[str, ...] = ()
    #: the node addresses NodePorts listen on (nodePortAddresses applied)
    node_port_ips: tuple[str, ...] = ()
    #: the Node's spec.podCIDRs (detectLocalMode NodeCIDR)
    node_pod_cidrs: tuple[str, ...] = ()
    #: backends over all frontends, and the IP families with frontends: computed
    #: on first use, or carried over by a partial plan (which then stays O(change))
    backend_total: int | None = field(default=None, compare=False, repr=False)
    family_set: frozenset[int] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, frontends: Iterable[Frontend],
              services: Iterable[ServiceSummary] = ()) -> ServiceMap:
        fmap = {f.key: f for f in frontends}
        owned: dict[str, list[FrontendKey]] = {}
        for f in fmap.values():
            owned.setdefault(f.service_key, []).append(f.key)
        return cls(fmap, {s.service: s for s in services},
                   {k: tuple(sorted(v)) for k, v in owned.items()})

    def __len__(self) -> int:
        return len(self.frontends)

    def __iter__(self) -> Iterator[Frontend]:
        """Frontends in a stable order (by address, port, protocol)."""
        for key in sorted(self.frontends):
            yield self.frontends[key]

    def __contains__(self, key: object) -> bool:
        return key in self.frontends

    def get(self, key: FrontendKey) -> Frontend | None:
        return self.frontends.get(key)

    def for_family(self, family: int) -> ServiceMap:
        """The part of the plan for one IP family (4 or 6)."""
        def fam(ips: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(a for a in ips if ip_family(a) == family)

        part = ServiceMap.build((f for f in self.frontends.values() if f.family == family),
                                self.services.values())
        return replace(part, node_ips=fam(self.node_ips), node_port_ips=fam(self.node_port_ips),
                       node_pod_cidrs=tuple(c for c in self.node_pod_cidrs
                                            if ip_family(c.split("/")[0]) == family))

    def primary_ip(self, family: int) -> str | None:
        for a in self.node_ips:
            if ip_family(a) == family:
                return a
        return None

    def backend_count(self) -> int:
        if self.backend_total is None:
            object.__setattr__(self, "backend_total",
                               sum(len(f.backends) for f in self.frontends.values()))
        return self.backend_total  # type: ignore[return-value]

    def families(self) -> frozenset[int]:
        """IP families with at least one frontend (a partial plan keeps a family
        until the next full plan)."""
        if self.family_set is None:
            object.__setattr__(self, "family_set", frozenset(
                ip_family(k.address) for k in self.frontends))
        return self.family_set  # type: ignore[return-value]

    def diff(self, old: ServiceMap) -> PlanDelta:
        """Frontends created, updated (any field differs) and deleted since `old`."""
        created = [k for k in self.frontends if k not in old.frontends]
        deleted = [k for k in old.frontends if k not in self.frontends]
        updated = [k for k, f in self.frontends.items()
                   if k in old.frontends and old.frontends[k] != f]
        return PlanDelta(tuple(sorted(created)), tuple(sorted(updated)), tuple(sorted(deleted)))

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self]
