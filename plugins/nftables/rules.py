"""kube-proxy's nftables-mode layout, rendered from the plan IR, made lighter.

Pure functions, no kernel access. Every rule, set declaration and element is
rendered in the text `nft list table` prints back (mark masks as 0x%08x,
priorities by name where nft names them, anonymous sets sorted, durations as
`3h`), so the same text is transaction input, `svcproxy plan -o nft` output,
and comparable line by line with what the kernel holds.

The table, chain, set and map names and the base chains' hooks and
priorities are kube-proxy's (pkg/proxy/nftables/proxier.go), so a node can be
taken over from kube-proxy's nftables mode in place. Where the table differs,
it is to load faster (measured: benchmarks/RESULTS.md): an endpoint is chosen
by `numgen random mod N` rules that DNAT themselves, not by one anonymous
verdict map per service into per-endpoint chains (endpoint chains remain only
for session affinity); off-cluster traffic to ClusterIPs is marked by one rule
on @cluster-ips rather than one per service; hairpin masquerade is one rule on
a set of this node's endpoints rather than one per endpoint. The
per-service-port decisions (which chains, which verdict without endpoints) are
the iptables datapath's, shared: both are kube-proxy's syncProxyRules. See
docs/nftables.md.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from svcproxy.ir import Backend, Frontend
from svcproxy.plugins.iptables.rules import PortPlan, RuleOptions, port_plan, udp_endpoints
from svcproxy.plugins.kernel.nftables import addr_type, family_word

# chains every table has
FILTER_PREROUTING = "filter-prerouting"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
FILTER_OUTPUT_POST_DNAT = "filter-output-post-dnat"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"
SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_IPS = "cluster-ips"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

TABLE_COMMENT = "rules for kube-proxy"
#: prefixes of per-service-port chains and sets (kube-proxy's)
SERVICE_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
FIREWALL_PREFIX = "firewall-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"
#: endpoint . endpoint: connections DNATed back to their own source
HAIRPIN = "hairpin-endpoints"
#: sets whose elements several service ports may hold (counted per holder)
SHARED_SETS = frozenset({"cluster-ips", HAIRPIN})


@dataclass(frozen=True)
class BaseChain:
    name: str
    type: str
    hook: str
    priority: int

    def header(self) -> str:
        """The chain's first line as nft prints it."""
        return (f"type {self.type} hook {self.hook} priority "
                f"{_priority_name(self.hook, self.priority)}; policy accept;")

    def declaration(self) -> str:
        return f"{{ type {self.type} hook {self.hook} priority {self.priority} ; }}"


def _priority_name(hook: str, priority: int) -> str:
    """nft names priorities relative to the standard ones where it can (as
    nft 1.0 prints them for the ip/ip6 families: dstnat only at prerouting,
    srcnat only at postrouting)."""
    named = {"prerouting": ("dstnat", -100), "postrouting": ("srcnat", 100)}.get(hook)
    if named is None:
        return str(priority)
    name, value = named
    if priority == value:
        return name
    return f"{name} {'+' if priority > value else '-'} {abs(priority - value)}"


#: kube-proxy's base chains: filtering before DNAT (dstnat - 10), NAT at the
#: standard priorities, a post-DNAT output filter (dstnat + 10)
BASE_CHAINS: tuple[BaseChain, ...] = (
    BaseChain(FILTER_PREROUTING, "filter", "prerouting", -110),
    BaseChain(FILTER_INPUT, "filter", "input", -110),
    BaseChain(FILTER_FORWARD, "filter", "forward", -110),
    BaseChain(FILTER_OUTPUT, "filter", "output", -110),
    BaseChain(FILTER_OUTPUT_POST_DNAT, "filter", "output", -90),
    BaseChain(NAT_PREROUTING, "nat", "prerouting", -100),
    BaseChain(NAT_OUTPUT, "nat", "output", -100),
    BaseChain(NAT_POSTROUTING, "nat", "postrouting", 100),
)
BASE_CHAIN_NAMES = frozenset(b.name for b in BASE_CHAINS)

#: jumps from base chains, in kube-proxy's order (nftablesJumpChains)
JUMPS: tuple[tuple[str, str, str], ...] = (
    (NODEPORT_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new "),
    (SERVICE_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new "),
    (SERVICE_ENDPOINTS_CHECK, FILTER_FORWARD, "ct state new "),
    (SERVICE_ENDPOINTS_CHECK, FILTER_OUTPUT, "ct state new "),
    (FIREWALL_CHECK, FILTER_PREROUTING, "ct state new "),
    (FIREWALL_CHECK, FILTER_OUTPUT, "ct state new "),
    (SERVICES, NAT_OUTPUT, ""),
    (SERVICES, NAT_PREROUTING, ""),
    (MASQUERADING, NAT_POSTROUTING, ""),
    (CLUSTER_IPS_CHECK, FILTER_FORWARD, "ct state new "),
    (CLUSTER_IPS_CHECK, FILTER_OUTPUT_POST_DNAT, "ct state new "),
)

Chain = tuple[tuple[str, ...], tuple[str, ...]]  # (header lines, rules)
ElementKey = tuple[str, str]  # (set or map, element key)


@dataclass(frozen=True)
class NftOptions:
    """Config-derived settings for rendering (one per IP family)."""

    family: int = 4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    #: "from a local pod": ("saddr", cidr) or ("iifname", name, "*" for a prefix)
    local_detector: tuple[str, str] | None = None
    #: None = every local address (fib daddr type local); else the node
    #: addresses NodePorts answer on (the nodeport-ips set)
    node_port_ips: tuple[str, ...] | None = None
    #: the node's primary IP (LoadBalancer source ranges that contain it also
    #: admit the node's own hairpin traffic, as kube-proxy does)
    node_ip: str | None = None

    @property
    def ip(self) -> str:
        return family_word(self.family)

    @property
    def addr(self) -> str:
        return addr_type(self.family)

    @property
    def mark(self) -> str:
        return f"0x{1 << self.masquerade_bit:08x}"

    @property
    def no_localhost(self) -> str:
        return "ip6 daddr != ::1" if self.family == 6 else "ip daddr != 127.0.0.0/8"

    def if_local(self) -> str:
        assert self.local_detector is not None
        kind, value = self.local_detector
        return f"{self.ip} saddr {value}" if kind == "saddr" else f'iifname "{value}"'

    def if_not_local(self) -> str:
        assert self.local_detector is not None
        kind, value = self.local_detector
        return f"{self.ip} saddr != {value}" if kind == "saddr" else f'iifname != "{value}"'


# ---- names -----------------------------------------------------------------------

def _hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: base32(sha256(name))[:8] + "-" + name,
    cut to 240 characters."""
    encoded = base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode()
    out = encoded[:8] + "-" + name
    return out if len(out) <= 240 else out[:237] + "..."


def _port_name(service_port: str, protocol: str) -> str:
    """ "ns/name:port" + "tcp" -> "ns/name/tcp/port" (kube-proxy's
    servicePortChainNameBase input)."""
    svc, _, port = service_port.partition(":")
    return f"{svc}/{protocol}/{port}"


def port_chain_base(service_port: str, protocol: str) -> str:
    return _hash_and_truncate(_port_name(service_port, protocol))


def endpoint_base(service_port: str, protocol: str, address: str, port: int) -> str:
    ip = address.replace(":", ".")
    return _hash_and_truncate(f"{_port_name(service_port, protocol)}__{ip}/{port}")


def is_service_chain(name: str) -> bool:
    """Per-service-port chains carry a "/" (kube-proxy's isServiceChainName)."""
    return "/" in name


# ---- canonical text ----------------------------------------------------------------

def duration(seconds: int) -> str:
    """A timeout as nft prints it: 10800 -> 3h, 90 -> 1m30s, 86400 -> 1d."""
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def anonymous_set(items: Iterable[str]) -> str:
    """CIDRs/addresses as nft prints an anonymous interval set: merged, sorted,
    hosts without a prefix length, braces only for more than one."""
    parsed = [ipaddress.ip_network(i, strict=False) for i in items]
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for version in (4, 6):
        nets.extend(ipaddress.collapse_addresses(  # type: ignore[type-var]
            n for n in parsed if n.version == version))
    texts = [str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
             for n in sorted(nets)]
    return texts[0] if len(texts) == 1 else "{ " + ", ".join(texts) + " }"


def element_key(*parts: object) -> str:
    return " . ".join(str(p) for p in parts)


# ---- one service port --------------------------------------------------------------

@dataclass(frozen=True)
class ServicePortBlock:
    """Everything one service port (in one family) contributes: chains it owns,
    elements in the shared maps and sets, its affinity sets."""

    chains: dict[str, Chain] = field(default_factory=dict)
    elements: dict[ElementKey, str] = field(default_factory=dict)
    #: affinity set name -> declaration lines
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    udp_targets: tuple[tuple[str, int], ...] = ()  # (frontend address, port)
    endpoints: frozenset[str] = frozenset()  # endpoint IPs reachable through it (UDP only)


@dataclass(frozen=True)
class _Names:
    cluster: str
    local: str
    external: str
    firewall: str


def _dnat(pp: PortPlan, b: Backend) -> str:
    return (f"meta l4proto {pp.proto} counter packets 0 bytes 0 "
            f"dnat to {host_port(b.address, b.port)}")


def _endpoint_rules(chain_rules: list[str], pp: PortPlan, backends: Sequence[Backend],
                    opts: NftOptions) -> None:
    """One numgen rule per endpoint: endpoint i of n with weights w is taken
    with probability w_i / (w_i + ... + w_n), so each is chosen in proportion
    to its weight (as iptables' statistic rules). Without session affinity the
    rule DNATs itself; with it, it goes to the endpoint's chain, which records
    the client, after the lookups that send a known client back."""
    affinity = pp.affinity
    if affinity:
        for b in backends:
            base = endpoint_base(pp.spn, pp.proto, b.address, b.port)
            chain_rules.append(f"{opts.ip} saddr @{AFFINITY_PREFIX}{base} "
                               f"goto {ENDPOINT_PREFIX}{base}")
    remaining = sum(b.weight for b in backends)
    for i, b in enumerate(backends):
        last = i == len(backends) - 1
        test = "" if last else \
            f"numgen random mod {remaining} {'0' if b.weight == 1 else f'< {b.weight}'} "
        if affinity:
            base = endpoint_base(pp.spn, pp.proto, b.address, b.port)
            chain_rules.append(f"{test}goto {ENDPOINT_PREFIX}{base}")
        else:
            chain_rules.append(f"meta l4proto {pp.proto} {test}counter packets 0 bytes 0 "
                               f"dnat to {host_port(b.address, b.port)}")
        remaining -= b.weight


def _elements(pp: PortPlan, names: _Names, opts: NftOptions) -> dict[ElementKey, str]:
    proto = pp.proto
    out: dict[ElementKey, str] = {}
    none_verdict = f"goto {REJECT_CHAIN}" if not pp.has_endpoints else "drop"
    if pp.cluster_ip is not None:
        f = pp.cluster_ip
        out[(CLUSTER_IPS, f.address)] = ""
        key = element_key(f.address, proto, f.port)
        if pp.has_internal:
            internal = names.local if f.traffic_policy == "Local" else names.cluster
            out[(SERVICE_IPS, key)] = f"goto {internal}"
        else:
            out[(NO_ENDPOINT_SERVICES, key)] = none_verdict
    for f in (*pp.ext_ips, *pp.lbs):
        key = element_key(f.address, proto, f.port)
        if pp.has_endpoints:
            out[(SERVICE_IPS, key)] = f"goto {names.external}"
        if not pp.has_external:
            out[(NO_ENDPOINT_SERVICES, key)] = none_verdict
        if pp.uses_fw and f in pp.lbs:
            out[(FIREWALL_IPS, key)] = f"goto {names.firewall}"
    if pp.node_ports:
        key = element_key(proto, pp.node_ports[0].port)
        if pp.has_endpoints:
            out[(SERVICE_NODEPORTS, key)] = f"goto {names.external}"
        if not pp.has_external:
            out[(NO_ENDPOINT_NODEPORTS, key)] = none_verdict
    return out


def _external_chain(pp: PortPlan, names: _Names, opts: NftOptions) -> list[str]:
    rules: list[str] = []
    if not pp.external_local:
        rules.append(f"jump {MARK_MASQ}")
    elif pp.uses_svc:
        # pods and the node itself may use any endpoint; only traffic from
        # outside is held to local endpoints (and keeps its source address)
        if opts.local_detector is not None:
            rules.append(f'{opts.if_local()} goto {names.cluster} '
                         'comment "short-circuit pod traffic"')
        rules.append(f'fib saddr type local jump {MARK_MASQ} comment "masquerade local traffic"')
        rules.append(f'fib saddr type local goto {names.cluster} '
                     'comment "short-circuit local traffic"')
    if pp.has_external:
        rules.append(f"goto {names.local if pp.external_local else names.cluster}")
    return rules


def _firewall_chain(pp: PortPlan, opts: NftOptions) -> list[str]:
    sources = list(pp.sources)
    node_ip = opts.node_ip
    if node_ip and any(ipaddress.ip_address(node_ip) in ipaddress.ip_network(c, strict=False)
                       for c in pp.sources):
        sources += [f.address for f in pp.lbs]
    return [f"{opts.ip} saddr != {anonymous_set(sources)} drop"]


def _endpoint_chain(pp: PortPlan, b: Backend, opts: NftOptions) -> tuple[str, list[str]]:
    """A session-affinity endpoint's chain: record the client, DNAT."""
    base = endpoint_base(pp.spn, pp.proto, b.address, b.port)
    return ENDPOINT_PREFIX + base, [f"update @{AFFINITY_PREFIX}{base} {{ {opts.ip} saddr }}",
                                    _dnat(pp, b)]


def affinity_header(opts: NftOptions, seconds: int) -> tuple[str, ...]:
    return (f"type {opts.addr}", "size 65535", "flags dynamic,timeout",
            f"timeout {duration(seconds)}")


def service_port_block(frontends: Sequence[Frontend], opts: NftOptions) -> ServicePortBlock:
    """kube-proxy nftables mode's per-service-port part of syncProxyRules, for
    the frontends of one service port in one family."""
    pp = port_plan(frontends, RuleOptions(family=opts.family))
    base = port_chain_base(pp.spn, pp.proto)
    names = _Names(SERVICE_PREFIX + base, LOCAL_PREFIX + base, EXTERNAL_PREFIX + base,
                   FIREWALL_PREFIX + base)
    rules: dict[str, list[str]] = {}
    if pp.uses_svc:
        rules[names.cluster] = []
        _endpoint_rules(rules[names.cluster], pp, pp.cluster_eps, opts)
    if pp.uses_svl:
        rules[names.local] = []
        _endpoint_rules(rules[names.local], pp, pp.local_eps, opts)
    if pp.uses_ext:
        rules[names.external] = _external_chain(pp, names, opts)
    if pp.uses_fw:
        rules[names.firewall] = _firewall_chain(pp, opts)
    sets: dict[str, tuple[str, ...]] = {}
    if pp.affinity:
        for b in pp.reachable.values():
            name, ep_rules = _endpoint_chain(pp, b, opts)
            rules[name] = ep_rules
            sets[AFFINITY_PREFIX + name[len(ENDPOINT_PREFIX):]] = \
                affinity_header(opts, pp.affinity)
    elements = _elements(pp, names, opts)
    # an endpoint on this node that reaches itself through the service is
    # masqueraded (kube-proxy's per-endpoint "saddr is the endpoint" rule, as
    # one set; only a pod here can send such a packet through this node)
    for b in pp.reachable.values():
        if b.local:
            elements[(HAIRPIN, element_key(b.address, b.address))] = ""
    # every chain a map element or the external chain names exists, even empty
    for value in elements.values():
        if value.startswith("goto ") and value != f"goto {REJECT_CHAIN}":
            rules.setdefault(value[5:], [])
    if pp.uses_ext:
        for name in (names.cluster, names.local):
            if any(rule.endswith(name) or f" {name} " in rule for rule in rules[names.external]):
                rules.setdefault(name, [])
    udp = tuple((f.address, f.port) for f in frontends) if pp.proto == "udp" else ()
    return ServicePortBlock(
        chains={name: ((), tuple(rs)) for name, rs in rules.items()},
        elements=elements, sets=sets, udp_targets=udp, endpoints=udp_endpoints(pp))


# ---- the fixed part of the table -------------------------------------------------------

@dataclass(frozen=True)
class Skeleton:
    """Base chains, top-level chains and the shared maps and sets: what depends
    on the config only, in the order a first sync creates them."""

    sets: dict[str, tuple[str, tuple[str, ...]]]  # name -> (kind, declaration lines)
    chains: dict[str, Chain]
    #: elements of config-only sets (nodeport-ips)
    elements: dict[ElementKey, str]


def skeleton(opts: NftOptions) -> Skeleton:
    ip, addr, mark = opts.ip, opts.addr, opts.mark
    sets: dict[str, tuple[str, tuple[str, ...]]] = {
        CLUSTER_IPS: ("set", (f"type {addr}", 'comment "Active ClusterIPs"')),
    }
    sets[HAIRPIN] = ("set", (f"type {addr} . {addr}",
                             'comment "endpoints masqueraded when they reach themselves"'))
    elements: dict[ElementKey, str] = {}
    if opts.node_port_ips is not None:
        sets[NODEPORT_IPS] = ("set", (f"type {addr}", 'comment "IPs that accept NodePort '
                                                     'traffic"'))
        elements = {(NODEPORT_IPS, a): "" for a in opts.node_port_ips}
    sets.update({
        NO_ENDPOINT_SERVICES: ("map", (
            f"type {addr} . inet_proto . inet_service : verdict",
            'comment "vmap to drop or reject packets to services with no endpoints"')),
        NO_ENDPOINT_NODEPORTS: ("map", (
            "type inet_proto . inet_service : verdict",
            'comment "vmap to drop or reject packets to service nodeports with no endpoints"')),
        FIREWALL_IPS: ("map", (
            f"type {addr} . inet_proto . inet_service : verdict",
            'comment "destinations that are subject to LoadBalancerSourceRanges"')),
        SERVICE_IPS: ("map", (
            f"type {addr} . inet_proto . inet_service : verdict",
            'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"')),
        SERVICE_NODEPORTS: ("map", ("type inet_proto . inet_service : verdict",
                                    'comment "NodePort traffic"')),
    })
    rules: dict[str, list[str]] = {b.name: [] for b in BASE_CHAINS}
    headers: dict[str, tuple[str, ...]] = {b.name: (b.header(),) for b in BASE_CHAINS}
    for name in (NODEPORT_ENDPOINTS_CHECK, SERVICE_ENDPOINTS_CHECK, FIREWALL_CHECK, SERVICES,
                 MASQUERADING, CLUSTER_IPS_CHECK, MARK_MASQ, REJECT_CHAIN):
        rules[name] = []
    for target, source, prefix in JUMPS:
        rules[source].append(f"{prefix}jump {target}")
    rules[MARK_MASQ] = [f"meta mark set meta mark | {mark}"]
    rules[MASQUERADING] = [f"ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN} "
                           "masquerade fully-random",
                           f"meta mark & {mark} == 0x00000000 return",
                           f"meta mark set meta mark ^ {mark}", "masquerade fully-random"]
    rules[CLUSTER_IPS_CHECK] = [f'{ip} daddr @{CLUSTER_IPS} reject comment '
                                '"Reject traffic to invalid ports of ClusterIPs"']
    headers[REJECT_CHAIN] = ('comment "helper for @no-endpoint-services / '
                             '@no-endpoint-nodeports"',)
    rules[REJECT_CHAIN] = ["reject"]
    rules[SERVICE_ENDPOINTS_CHECK] = [
        f"{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"]
    rules[FIREWALL_CHECK] = [f"{ip} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"]
    if opts.node_port_ips is None:
        rules[NODEPORT_ENDPOINTS_CHECK] = [
            f"{opts.no_localhost} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"]
        nodeports = (f"fib daddr type local {opts.no_localhost} meta l4proto . th dport "
                     f"vmap @{SERVICE_NODEPORTS}")
    else:
        rules[NODEPORT_ENDPOINTS_CHECK] = [
            f"{ip} daddr @{NODEPORT_IPS} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"]
        nodeports = (f"{ip} daddr @{NODEPORT_IPS} meta l4proto . th dport "
                     f"vmap @{SERVICE_NODEPORTS}")
    # traffic to a ClusterIP from outside the cluster (or all of it, with
    # masqueradeAll) is masqueraded: kube-proxy's per-service rule, once
    masquerade: list[str] = []
    if opts.masquerade_all:
        masquerade = [f"{ip} daddr @{CLUSTER_IPS} jump {MARK_MASQ}"]
    elif opts.local_detector is not None:
        masquerade = [f"{ip} daddr @{CLUSTER_IPS} {opts.if_not_local()} jump {MARK_MASQ}"]
    rules[SERVICES] = [*masquerade, f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                       nodeports]
    chains = {name: (headers.get(name, ()), tuple(rs)) for name, rs in rules.items()}
    return Skeleton(sets, chains, elements)
