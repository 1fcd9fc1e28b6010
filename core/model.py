"""Cluster objects svcproxy acts on — Service, EndpointSlice, Node — as frozen
dataclasses parsed from Kubernetes API dicts (what the API server returns and
what `kubectl get -o yaml` writes).

Parsing validates what a proxy depends on and raises ObjectError naming the
object and the field; fields a proxy does not use are ignored. Defaults follow
the API server's (for example a port's protocol is TCP when unset).
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Literal

from .errors import ObjectError

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[str, ...] = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
TRAFFIC_POLICIES = ("Cluster", "Local")

#: Services with this label belong to another proxy (kube-proxy skips them too).
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
#: Services with this label are headless (endpoints controller label).
LABEL_HEADLESS = "service.kubernetes.io/headless"
#: EndpointSlices name their Service with this label.
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_ZONE = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800


def _err(kind: str, name: str, path: str, value: Any, problem: str) -> ObjectError:
    return ObjectError(kind, name, path, value, problem)


def _canonical_ipv4(value: str) -> bool:
    """Whether `value` is a dotted quad exactly as ipaddress would print it: it
    round-trips through inet_pton/inet_ntoa (ipaddress took a third of reading
    10,000 EndpointSlices)."""
    if ":" in value:
        return False
    try:
        return socket.inet_ntoa(socket.inet_pton(socket.AF_INET, value)) == value
    except (OSError, ValueError):  # ValueError: a NUL inside
        return False


class _Reader:
    """Typed access to one API object's fields with errors naming the object."""

    def __init__(self, kind: str, obj: Any, namespaced: bool = True) -> None:
        self.kind = kind
        if not isinstance(obj, Mapping):
            raise _err(kind, "<unknown>", "", obj, "an object must be a mapping")
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            raise _err(kind, "<unknown>", "metadata", meta, "metadata must be a mapping")
        namespace = meta.get("namespace") or ("default" if namespaced else "")
        name = meta.get("name")
        shown = f"{namespace}/{name}" if namespace else str(name)
        self.display = shown
        if not isinstance(name, str) or not name:
            raise _err(kind, shown, "metadata.name", name, "a name is required")
        if not isinstance(namespace, str):
            raise _err(kind, shown, "metadata.namespace", namespace, "must be a string")
        self.namespace: str = intern(namespace)  # (a few, on every object)
        self.name: str = name
        self.obj = obj
        self.meta = meta

    def error(self, path: str, value: Any, problem: str) -> ObjectError:
        return _err(self.kind, self.display, path, value, problem)

    def mapping(self, parent: Any, key: str, path: str) -> Mapping[str, Any]:
        value = parent.get(key) if isinstance(parent, Mapping) else None
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, value, "must be a mapping")
        return value

    def seq(self, parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, value, "must be a list")
        return value

    def string(self, parent: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
        value = parent.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(path, value, "must be a string")
        return value

    def word(self, parent: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
        """A string field with few distinct values (a protocol, a policy, a port
        name), interned: one copy for the whole cluster, not one per object (a
        parsed API object's strings are all distinct)."""
        return intern(self.string(parent, key, path, default))

    def boolean(self, parent: Mapping[str, Any], key: str, path: str) -> bool | None:
        value = parent.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(path, value, "must be true or false")
        return value

    def integer(self, parent: Mapping[str, Any], key: str, path: str, lo: int, hi: int,
                default: int | None = None) -> int | None:
        value = parent.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, value, "must be an integer")
        if not lo <= value <= hi:
            raise self.error(path, value, f"must be between {lo} and {hi}")
        return value

    def ip(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, value, "must be an IP address")
        if _canonical_ipv4(value):  # the common case, in C
            return value
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.error(path, value, "not a valid IP address") from None

    def labels(self, key: str) -> dict[str, str]:
        raw = self.mapping(self.meta, key, f"metadata.{key}")
        out = {}
        for k, v in raw.items():
            if not isinstance(v, str):
                raise self.error(f"metadata.{key}.{k}", v, "must be a string")
            out[intern(str(k))] = intern(v) if len(v) <= 63 else v  # (label-sized: shared)
        return out


def _frozen_map(d: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if len(d) < 2:  # most objects: no annotations, one label
        return tuple(d.items())
    return tuple(sorted(d.items()))


# ---- Service -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: Protocol
    port: int
    target_port: int | str
    node_port: int = 0
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class LoadBalancerIngress:
    ip: str = ""
    hostname: str = ""
    #: "VIP" (default) or "Proxy"; Proxy ingress IPs are not programmed.
    ip_mode: str = "VIP"


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    headless: bool = False
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ingress: tuple[LoadBalancerIngress, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity: str = "None"
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    health_check_node_port: int = 0
    external_name: str = ""
    traffic_distribution: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    resource_version: str = field(default="", compare=False)

    kind = "Service"

    @property
    def key(self) -> str:
        # interned: the indexes that hold it (the cluster state, the sources,
        # the plan) and the slices' service_key share one copy
        return intern(f"{self.namespace}/{self.name}")

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)

    def annotation(self, name: str) -> str | None:
        if not self.annotations:  # the common case, on every frontend of every plan
            return None
        return dict(self.annotations).get(name)

    @property
    def ignore_reason(self) -> str | None:
        """Why svcproxy does not proxy this Service, or None when it does."""
        if self.type == "ExternalName":
            return "ExternalName services are resolved by DNS, not proxied"
        if self.headless:
            return "headless service (clusterIP: None)"
        if self.label(LABEL_SERVICE_PROXY_NAME) is not None:
            return f"owned by another proxy ({LABEL_SERVICE_PROXY_NAME}=" \
                   f"{self.label(LABEL_SERVICE_PROXY_NAME)})"
        if not self.cluster_ips:
            return "no clusterIP allocated yet"
        return None

    @property
    def externally_accessible(self) -> bool:
        """kube-proxy's ExternallyAccessible: reachable by NodePort, LB or external IPs."""
        return bool(any(p.node_port for p in self.ports) or self.external_ips
                    or any(i.ip for i in self.load_balancer_ingress))


def parse_service(obj: Any) -> Service:
    r = _Reader("Service", obj)
    spec = r.mapping(obj, "spec", "spec")
    status = r.mapping(obj, "status", "status")
    svc_type = r.word(spec, "type", "spec.type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise r.error("spec.type", svc_type, f"must be one of {', '.join(SERVICE_TYPES)}")
    cluster_ips, headless = _cluster_ips(r, spec)
    external_ips = tuple(r.ip(ip, f"spec.externalIPs[{i}]")
                         for i, ip in enumerate(r.seq(spec, "externalIPs", "spec.externalIPs")))
    affinity, timeout = _affinity(r, spec)
    etp = r.word(spec, "externalTrafficPolicy", "spec.externalTrafficPolicy", "Cluster")
    # "Global" is the pre-1.19 spelling of Cluster; the API server still accepts it.
    etp = "Cluster" if etp == "Global" else etp
    if etp not in TRAFFIC_POLICIES:
        raise r.error("spec.externalTrafficPolicy", etp, "must be Cluster or Local")
    itp = r.word(spec, "internalTrafficPolicy", "spec.internalTrafficPolicy", "Cluster")
    if itp not in TRAFFIC_POLICIES:
        raise r.error("spec.internalTrafficPolicy", itp, "must be Cluster or Local")
    hc = r.integer(spec, "healthCheckNodePort", "spec.healthCheckNodePort", 0, 65535, 0) or 0

    return Service(
        namespace=r.namespace, name=r.name, type=svc_type,
        cluster_ips=cluster_ips, headless=headless, ports=_service_ports(r, spec),
        external_ips=external_ips, load_balancer_ingress=_ingress(r, status),
        load_balancer_source_ranges=_source_ranges(r, spec), session_affinity=affinity,
        affinity_timeout=timeout, external_traffic_policy=etp, internal_traffic_policy=itp,
        health_check_node_port=hc, external_name=r.string(spec, "externalName",
                                                          "spec.externalName"),
        traffic_distribution=r.word(spec, "trafficDistribution", "spec.trafficDistribution"),
        labels=_frozen_map(r.labels("labels")), annotations=_frozen_map(r.labels("annotations")),
        resource_version=str(r.meta.get("resourceVersion") or ""),
    )


def _cluster_ips(r: _Reader, spec: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    cluster_ips: list[str] = []
    headless = False
    raw_ips = r.seq(spec, "clusterIPs", "spec.clusterIPs")
    if not raw_ips and spec.get("clusterIP") not in (None, ""):
        raw_ips = [spec.get("clusterIP")]
    for i, ip in enumerate(raw_ips):
        if ip == "":
            continue  # not allocated (ExternalName, or a Service being created)
        if ip == "None":
            headless = True
            continue
        path = f"spec.clusterIPs[{i}]" if "clusterIPs" in spec else "spec.clusterIP"
        cluster_ips.append(r.ip(ip, path))
    families = {6 if ":" in ip else 4 for ip in cluster_ips}  # (r.ip checked them)
    if len(cluster_ips) > 2 or len(cluster_ips) != len(families):
        raise r.error("spec.clusterIPs", raw_ips, "at most one IPv4 and one IPv6 address")
    return tuple(cluster_ips), headless


def _service_ports(r: _Reader, spec: Mapping[str, Any]) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    raw_ports = r.seq(spec, "ports", "spec.ports")
    for i, p in enumerate(raw_ports):
        port = _service_port(r, p, f"spec.ports[{i}]", len(raw_ports) > 1)
        if (port.protocol, port.port) in seen:
            raise r.error(f"spec.ports[{i}].port", port.port, f"duplicate {port.protocol} port")
        seen.add((port.protocol, port.port))
        ports.append(port)
    return tuple(ports)


def _service_port(r: _Reader, p: Any, path: str, several: bool) -> ServicePort:
    if not isinstance(p, Mapping):
        raise r.error(path, p, "must be a mapping")
    name = r.word(p, "name", f"{path}.name")
    if several and not name:
        raise r.error(f"{path}.name", name, "every port needs a name when there are several")
    protocol = r.word(p, "protocol", f"{path}.protocol", "TCP")
    if protocol not in PROTOCOLS:
        raise r.error(f"{path}.protocol", protocol, "must be TCP, UDP or SCTP")
    port = r.integer(p, "port", f"{path}.port", 1, 65535)
    if port is None:
        raise r.error(f"{path}.port", None, "a port number is required")
    target = p.get("targetPort", port)
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise r.error(f"{path}.targetPort", target, "must be a port number or a port name")
    if isinstance(target, int) and not 1 <= target <= 65535:
        raise r.error(f"{path}.targetPort", target, "must be between 1 and 65535")
    node_port = r.integer(p, "nodePort", f"{path}.nodePort", 0, 65535, 0) or 0
    return ServicePort(name=name, protocol=protocol,  # type: ignore[arg-type]
                       port=port, target_port=target, node_port=node_port,
                       app_protocol=r.word(p, "appProtocol", f"{path}.appProtocol"))


def _ingress(r: _Reader, status: Mapping[str, Any]) -> tuple[LoadBalancerIngress, ...]:
    lb = r.mapping(status, "loadBalancer", "status.loadBalancer")
    ingress: list[LoadBalancerIngress] = []
    for i, ing in enumerate(r.seq(lb, "ingress", "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        if not isinstance(ing, Mapping):
            raise r.error(path, ing, "must be a mapping")
        ip = r.ip(ing["ip"], f"{path}.ip") if ing.get("ip") else ""
        ip_mode = r.string(ing, "ipMode", f"{path}.ipMode", "VIP")
        if ip_mode not in ("VIP", "Proxy"):
            raise r.error(f"{path}.ipMode", ip_mode, "must be VIP or Proxy")
        ingress.append(LoadBalancerIngress(ip=ip, hostname=r.string(ing, "hostname",
                                                                       f"{path}.hostname"),
                                           ip_mode=ip_mode))
    return tuple(ingress)


def _source_ranges(r: _Reader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    ranges: list[str] = []
    for i, cidr in enumerate(r.seq(spec, "loadBalancerSourceRanges",
                                   "spec.loadBalancerSourceRanges")):
        path = f"spec.loadBalancerSourceRanges[{i}]"
        try:
            ranges.append(str(ipaddress.ip_network(str(cidr).strip(), strict=False)))
        except ValueError:
            raise r.error(path, cidr, "not a valid CIDR") from None
    return tuple(ranges)


def _affinity(r: _Reader, spec: Mapping[str, Any]) -> tuple[str, int]:
    affinity = r.word(spec, "sessionAffinity", "spec.sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        raise r.error("spec.sessionAffinity", affinity, "must be None or ClientIP")
    timeout = DEFAULT_AFFINITY_TIMEOUT
    if affinity == "ClientIP":
        cfg = r.mapping(r.mapping(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig"),
                        "clientIP", "spec.sessionAffinityConfig.clientIP")
        timeout = r.integer(cfg, "timeoutSeconds",
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, 86400,
                            DEFAULT_AFFINITY_TIMEOUT) or DEFAULT_AFFINITY_TIMEOUT
    return affinity, timeout


# ---- EndpointSlice -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    #: conditions with the API's nil defaults resolved: ready nil => true,
    #: serving nil => ready, terminating nil => false
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    hint_zones: tuple[str, ...] = ()
    hint_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int | None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    resource_version: str = field(default="", compare=False)

    kind = "EndpointSlice"

    @property
    def key(self) -> str:
        return intern(f"{self.namespace}/{self.name}")  # (as Service.key)

    @property
    def service_key(self) -> str:
        return intern(f"{self.namespace}/{self.service_name}")

    def annotation(self, name: str) -> str | None:
        return dict(self.annotations).get(name)


def _plain_endpoint(ep: Any) -> Endpoint | None:
    """An IPv4 slice's endpoint in the shape nearly all are in (a dict of
    canonical dotted quads, boolean conditions, string nodeName/zone, no
    hints), read without building a field path per value; None sends it to
    the checking reader below, which names what is wrong (or reads the
    unusual). Equal to that reader's result whenever it returns one
    (tests/unit/test_fuzz.py compares them)."""
    if type(ep) is not dict or "hints" in ep:
        return None
    addrs = ep.get("addresses")
    if type(addrs) is not list:
        return None
    for a in addrs:
        if type(a) is not str or not _canonical_ipv4(a):
            return None
    cond = ep.get("conditions")
    if cond is None:
        cond = {}
    elif type(cond) is not dict:
        return None
    ready, serving, terminating = (cond.get("ready"), cond.get("serving"),
                                   cond.get("terminating"))
    node, zone = ep.get("nodeName"), ep.get("zone")
    for flag in (ready, serving, terminating):
        if flag is not None and type(flag) is not bool:
            return None
    node = "" if node is None else node
    zone = "" if zone is None else zone
    if type(node) is not str or type(zone) is not str:
        return None
    ready_b = True if ready is None else ready
    return Endpoint(addresses=tuple(addrs), ready=ready_b,
                    serving=ready_b if serving is None else serving,
                    terminating=bool(terminating), node_name=intern(node), zone=intern(zone))


def parse_endpoint_slice(obj: Any) -> EndpointSlice:
    r = _Reader("EndpointSlice", obj)
    labels = r.labels("labels")
    service_name = labels.get(LABEL_SERVICE_NAME, "")
    address_type = r.word(obj, "addressType", "addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise r.error("addressType", address_type, "must be IPv4, IPv6 or FQDN")
    endpoints: list[Endpoint] = []
    plain = address_type == "IPv4"
    for i, ep in enumerate(r.seq(obj, "endpoints", "endpoints")):
        fast = _plain_endpoint(ep) if plain else None
        if fast is not None:
            endpoints.append(fast)
            continue
        path = f"endpoints[{i}]"
        if not isinstance(ep, Mapping):
            raise r.error(path, ep, "must be a mapping")
        addrs = r.seq(ep, "addresses", f"{path}.addresses")
        if address_type == "FQDN":
            addresses = tuple(str(a) for a in addrs)
        else:
            addresses = tuple(r.ip(a, f"{path}.addresses[{j}]") for j, a in enumerate(addrs))
            want = address_type == "IPv6"
            for j, a in enumerate(addresses):
                if (":" in a) != want:  # canonical addresses: only IPv6 has a colon
                    raise r.error(f"{path}.addresses[{j}]", a,
                                  f"not an {address_type} address in an {address_type} slice")
        cond = r.mapping(ep, "conditions", f"{path}.conditions")
        ready = r.boolean(cond, "ready", f"{path}.conditions.ready")
        serving = r.boolean(cond, "serving", f"{path}.conditions.serving")
        terminating = r.boolean(cond, "terminating", f"{path}.conditions.terminating")
        ready_b = True if ready is None else ready
        hints = r.mapping(ep, "hints", f"{path}.hints")
        zones = tuple(str(z.get("name", "")) for z in r.seq(hints, "forZones",
                                                              f"{path}.hints.forZones")
                      if isinstance(z, Mapping))
        nodes = tuple(str(n.get("name", "")) for n in r.seq(hints, "forNodes",
                                                              f"{path}.hints.forNodes")
                      if isinstance(n, Mapping))
        endpoints.append(Endpoint(
            addresses=addresses, ready=ready_b,
            serving=ready_b if serving is None else serving,
            terminating=bool(terminating),
            # (a few names repeated on every endpoint: one copy each)
            node_name=intern(r.string(ep, "nodeName", f"{path}.nodeName")),
            zone=intern(r.string(ep, "zone", f"{path}.zone")), hint_zones=zones,
            hint_nodes=nodes))
    ports: list[EndpointPort] = []
    for i, p in enumerate(r.seq(obj, "ports", "ports")):
        path = f"ports[{i}]"
        if not isinstance(p, Mapping):
            raise r.error(path, p, "must be a mapping")
        protocol = r.word(p, "protocol", f"{path}.protocol", "TCP")
        if protocol not in PROTOCOLS:
            raise r.error(f"{path}.protocol", protocol, "must be TCP, UDP or SCTP")
        ports.append(EndpointPort(name=r.word(p, "name", f"{path}.name"),
                                  protocol=protocol,  # type: ignore[arg-type]
                                  port=r.integer(p, "port", f"{path}.port", 1, 65535)))
    return EndpointSlice(
        namespace=r.namespace, name=r.name, service_name=service_name,
        address_type=address_type, endpoints=tuple(endpoints), ports=tuple(ports),
        labels=_frozen_map(labels), annotations=_frozen_map(r.labels("annotations")),
        resource_version=str(r.meta.get("resourceVersion") or ""))


# ---- Node ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str
    address: str


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[NodeAddress, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str], ...] = ()  # (key, effect)
    deleting: bool = False
    pod_cidrs: tuple[str, ...] = ()
    resource_version: str = field(default="", compare=False)

    kind = "Node"
    namespace = ""

    @property
    def key(self) -> str:
        return self.name

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)

    @property
    def zone(self) -> str:
        return self.label(LABEL_ZONE) or ""

    def ips(self) -> tuple[str, ...]:
        """IP addresses of the node (InternalIP first, then ExternalIP), no duplicates."""
        order = {"InternalIP": 0, "ExternalIP": 1}
        out: list[str] = []
        for a in sorted(self.addresses, key=lambda a: order.get(a.type, 2)):
            if a.type in order and a.address not in out:
                out.append(a.address)
        return tuple(out)


def parse_node(obj: Any) -> Node:
    r = _Reader("Node", obj, namespaced=False)
    status = r.mapping(obj, "status", "status")
    spec = r.mapping(obj, "spec", "spec")
    addresses: list[NodeAddress] = []
    for i, a in enumerate(r.seq(status, "addresses", "status.addresses")):
        path = f"status.addresses[{i}]"
        if not isinstance(a, Mapping):
            raise r.error(path, a, "must be a mapping")
        atype = r.string(a, "type", f"{path}.type")
        value = r.string(a, "address", f"{path}.address")
        if atype in ("InternalIP", "ExternalIP"):
            value = r.ip(value, f"{path}.address")
        addresses.append(NodeAddress(type=atype, address=value))
    taints = tuple((str(t.get("key", "")), str(t.get("effect", "")))
                   for t in r.seq(spec, "taints", "spec.taints") if isinstance(t, Mapping))
    pod_cidrs = tuple(str(c) for c in r.seq(spec, "podCIDRs", "spec.podCIDRs"))
    if not pod_cidrs and spec.get("podCIDR"):
        pod_cidrs = (str(spec["podCIDR"]),)
    return Node(name=r.name, addresses=tuple(addresses), labels=_frozen_map(r.labels("labels")),
                taints=taints, deleting=bool(r.meta.get("deletionTimestamp")),
                pod_cidrs=pod_cidrs, resource_version=str(r.meta.get("resourceVersion") or ""))


# ---- dispatch ------------------------------------------------------------------

ClusterObject = Service | EndpointSlice | Node


class WatchedObject(typing.Protocol):
    """An object of a kind a plugin asked the sources for (svcproxy_watch_kinds):
    anything with a kind and a key; the core passes it to observers only."""

    kind: str

    @property
    def key(self) -> str: ...

PARSERS: dict[str, Callable[[Any], ClusterObject]] = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Node": parse_node,
}


def parse_object(obj: Mapping[str, Any]) -> ClusterObject:
    """Parse a Service, EndpointSlice or Node dict by its `kind`."""
    kind = obj.get("kind")
    parser = PARSERS.get(str(kind))
    if parser is None:
        raise ObjectError(str(kind), "<unknown>", "kind", kind,
                          "svcproxy reads Service, EndpointSlice and Node objects")
    return parser(obj)
