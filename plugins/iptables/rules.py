"""kube-proxy's iptables-mode rule layout, rendered from the plan IR.

Pure functions, no kernel access. Rules are rendered in the exact text
`iptables-save` prints back (address masks, match order, `--set-xmark`, the
`recent` defaults, the statistic probability as the kernel stores it), so the
same text is restore input, `svcproxy plan --output iptables-save` output, and
comparable line by line with what the kernel holds.

Layout and chain names follow kube-proxy (pkg/proxy/iptables/proxier.go); see
docs/iptables.md.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from svcproxy.ir import Backend, Frontend, FrontendKind

# Top-level chains svcproxy owns, per table, in kube-proxy's order.
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-FORWARD",
                 "KUBE-PROXY-FIREWALL")
#: per-service and per-endpoint chains (nat); any chain with these prefixes is svcproxy's
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

ChainKey = tuple[str, str]  # (table, chain)

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


def is_owned(table: str, chain: str) -> bool:
    """Whether a chain is one svcproxy (like kube-proxy's iptables mode) owns."""
    if table == "nat":
        return chain in NAT_CHAINS or chain.startswith(SERVICE_CHAIN_PREFIXES)
    if table == "filter":
        return chain in FILTER_CHAINS
    return False


# ---- names -----------------------------------------------------------------------

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
#: every pair of base32 characters, indexed by the 10 bits they encode
_B32_PAIRS = [a + b for a in _B32 for b in _B32]


def _hash(text: str) -> str:
    """base32(sha256(text))[:16]: 16 base32 characters are exactly the first 80
    bits, encoded here 10 bits at a time (base64.b32encode is slow pure Python
    and this runs for every endpoint of a large cluster)."""
    bits = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (p[bits >> 70] + p[(bits >> 60) & 1023] + p[(bits >> 50) & 1023]
            + p[(bits >> 40) & 1023] + p[(bits >> 30) & 1023] + p[(bits >> 20) & 1023]
            + p[(bits >> 10) & 1023] + p[bits & 1023])


def chain_suffix(service_port: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: base32(sha256(servicePortName + protocol))[:16]."""
    return _hash(service_port + protocol.lower())


def endpoint_chain(service_port: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-<hash(servicePortName + protocol + "ip:port")>. Not cached: 1.5 µs
    each, and a cache of every endpoint's name held ~15 MB at 10,000 services
    (its keys, links and the "ip:port" strings)."""
    return "KUBE-SEP-" + _hash(service_port + protocol.lower() + endpoint)


# ---- canonical rule text -------------------------------------------------------

def host(address: str) -> str:
    """An address as iptables-save prints a host match (IR addresses are already
    in canonical form)."""
    return f"{address}/128" if ":" in address else f"{address}/32"


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


_BARE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def comment(text: str) -> str:
    """The comment match as iptables-save prints it (libxtables'
    xtables_save_string): bare when every character is a letter, digit, _ or -,
    else double-quoted with ", ' and \\ escaped by a backslash. Any other
    spelling reads back differently and would be rewritten by every full sync."""
    if text and all(c in _BARE for c in text):
        return f"-m comment --comment {text}"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'-m comment --comment "{escaped}"'


@functools.lru_cache(maxsize=4096)
def probability(p: float) -> str:
    """The statistic match's probability as iptables-save prints it: kube-proxy
    writes %0.10f, the kernel keeps lround(p * 2^31) and save prints %.11f."""
    written = float(f"{p:0.10f}")
    stored = int(written * 0x80000000 + 0.5)
    return f"{stored / 0x80000000:.11f}"


def mark(bit: int) -> str:
    return f"{1 << bit:#x}"


def rule(chain: str, *, src: str | None = None, not_src: str | None = None,
         dst: str | None = None, not_dst: str | None = None, iface: str | None = None,
         not_iface: str | None = None, proto: str | None = None, matches: Sequence[str] = (),
         target: str | None = None) -> str:
    """One `-A` line in iptables-save's canonical order."""
    # plain concatenation: this runs for every rule of a large cluster
    line = "-A " + chain
    if not_src is not None:
        line += " ! -s " + not_src
    if src is not None:
        line += " -s " + src
    if not_dst is not None:
        line += " ! -d " + not_dst
    if dst is not None:
        line += " -d " + dst
    if not_iface is not None:
        line += " ! -i " + not_iface
    if iface is not None:
        line += " -i " + iface
    if proto is not None:
        line += " -p " + proto
    for m in matches:
        if m:
            line += " " + m
    if target is not None:
        line += " -j " + target
    return line


def port_match(proto: str, port: int) -> str:
    return f"-m {proto} --dport {port}"


# ---- settings a ruleset depends on ------------------------------------------------

@dataclass(frozen=True)
class RuleOptions:
    """Config-derived settings for rendering (one per IP family)."""

    family: int = 4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    #: "if local" source match for traffic from pods: ("-s", cidr) or ("-i", name)
    local_detector: tuple[str, str] | None = None
    tcp_be_liberal: bool = False
    random_fully: bool = True
    #: None = every local address (-m addrtype --dst-type LOCAL); otherwise the
    #: node addresses NodePorts listen on
    node_port_addresses: tuple[str, ...] | None = None
    #: the node's primary IP (LoadBalancer source ranges that contain it also
    #: admit the node's own hairpin traffic, as kube-proxy does)
    node_ip: str | None = None
    #: iptables.localhostNodePorts: NodePorts answer on 127.0.0.1 (IPv4 only)
    localhost_node_ports: bool = True

    @property
    def localnet(self) -> bool:
        """NodePorts on IPv4 loopback, as kube-proxy: localhostNodePorts, IPv4, and
        nodePortAddresses covering loopback (only "all" does: a node address
        list never holds 127.0.0.1). Needs route_localnet=1 and the martian
        filter in KUBE-FIREWALL."""
        return self.family == 4 and self.localhost_node_ports and \
            self.node_port_addresses is None

    @property
    def mark(self) -> str:
        return mark(self.masquerade_bit)

    def if_local(self) -> dict[str, str]:
        """rule() arguments matching traffic from local pods."""
        if self.local_detector is None:
            return {}
        kind, value = self.local_detector
        return {"src": value} if kind == "-s" else {"iface": value}

    def if_not_local(self) -> dict[str, str]:
        if self.local_detector is None:
            return {}
        kind, value = self.local_detector
        return {"not_src": value} if kind == "-s" else {"not_iface": value}

    def reject(self) -> str:
        return "REJECT --reject-with " + ("icmp-port-unreachable" if self.family == 4
                                           else "icmp6-port-unreachable")

    def recent_mask(self) -> str:
        return "255.255.255.255" if self.family == 4 else \
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def static_chains(opts: RuleOptions) -> dict[ChainKey, tuple[str, ...]]:
    """Chains whose content depends only on the config."""
    m = opts.mark
    masq = "MASQUERADE --random-fully" if opts.random_fully else "MASQUERADE"
    forward = []
    if not opts.tcp_be_liberal:
        forward.append(rule("KUBE-FORWARD", matches=["-m conntrack --ctstate INVALID"],
                            target="DROP"))
    forward += [
        rule("KUBE-FORWARD", matches=[comment("kubernetes forwarding rules"),
                                      f"-m mark --mark {m}/{m}"], target="ACCEPT"),
        rule("KUBE-FORWARD", matches=[comment("kubernetes forwarding conntrack rule"),
                                      "-m conntrack --ctstate RELATED,ESTABLISHED"],
             target="ACCEPT"),
    ]
    out = {
        ("nat", "KUBE-MARK-MASQ"): (rule("KUBE-MARK-MASQ", target=f"MARK --set-xmark {m}/{m}"),),
        ("nat", "KUBE-POSTROUTING"): (
            rule("KUBE-POSTROUTING", matches=[f"-m mark ! --mark {m}/{m}"], target="RETURN"),
            rule("KUBE-POSTROUTING", target=f"MARK --set-xmark {m}/0x0"),
            rule("KUBE-POSTROUTING",
                 matches=[comment("kubernetes service traffic requiring SNAT")], target=masq),
        ),
        ("filter", "KUBE-FORWARD"): tuple(forward),
    }
    if opts.localnet:
        out[FIREWALL] = (LOCALNET_FILTER,)
    return out


#: kube-proxy's (and kubelet's) chain for the martian filter below
FIREWALL: ChainKey = ("filter", "KUBE-FIREWALL")
#: route_localnet=1 lets 127.0.0.1 be DNATed to a pod, and would let other hosts
#: reach the node's loopback services: kube-proxy's mitigation (kubernetes
#: issue 90259), the rule kubelet writes too
LOCALNET_FILTER = ('-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment '
                   '"block incoming localnet connections" -m conntrack ! --ctstate '
                   'RELATED,ESTABLISHED,DNAT -j DROP')
LOCALNET_JUMPS: tuple[tuple[str, str, str], ...] = (
    ("filter", "INPUT", "-j KUBE-FIREWALL"), ("filter", "OUTPUT", "-j KUBE-FIREWALL"))


#: Jumps from built-in chains into svcproxy's chains: (table, chain, rule body).
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("filter", "INPUT", '-m conntrack --ctstate NEW -m comment --comment '
                        '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
    ("filter", "INPUT", '-m comment --comment "kubernetes health check service ports" '
                        '-j KUBE-NODEPORTS'),
    ("filter", "INPUT", '-m conntrack --ctstate NEW -m comment --comment '
                        '"kubernetes externally-visible service portals" '
                        '-j KUBE-EXTERNAL-SERVICES'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment '
                          '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment '
                          '"kubernetes service portals" -j KUBE-SERVICES'),
    ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment '
                          '"kubernetes externally-visible service portals" '
                          '-j KUBE-EXTERNAL-SERVICES'),
    ("filter", "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment '
                         '"kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
    ("filter", "OUTPUT", '-m conntrack --ctstate NEW -m comment --comment '
                         '"kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" '
                           '-j KUBE-POSTROUTING'),
)


# ---- one service port ----------------------------------------------------------------

@dataclass(frozen=True)
class ServicePortRules:
    """Everything one service port (in one family) contributes.

    `chains` are the per-service chains it owns outright; `fragments` are its
    rules inside the shared top-level chains."""

    chains: dict[ChainKey, tuple[str, ...]] = field(default_factory=dict)
    fragments: dict[ChainKey, tuple[str, ...]] = field(default_factory=dict)
    #: effective backends by frontend address (conntrack cleanup uses them)
    udp_targets: tuple[tuple[str, int], ...] = ()  # (frontend address, port)
    endpoints: frozenset[str] = frozenset()  # endpoint IPs reachable through it (UDP only)

    def fragment(self, chain: ChainKey) -> tuple[str, ...]:
        return self.fragments.get(chain, ())


def _live(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    # weight 0 means "no new connections" (draining): iptables has no weights,
    # so such a backend is simply not selectable.
    return tuple(b for b in backends if b.weight > 0)


def _endpoint_rules(chain: str, spn: str, proto: str, backends: Sequence[Backend],
                    affinity: int, opts: RuleOptions) -> list[str]:
    out: list[str] = []
    eps = [host_port(b.address, b.port) for b in backends]
    seps = [endpoint_chain(spn, proto, ep) for ep in eps]
    if affinity:
        for ep, sep in zip(eps, seps, strict=True):
            out.append(rule(chain, matches=[
                comment(f"{spn} -> {ep}"),
                f"-m recent --rcheck --seconds {affinity} --reap --name {sep} "
                f"--mask {opts.recent_mask()} --rsource"], target=sep))
    remaining = sum(b.weight for b in backends)
    for i, (b, ep, sep) in enumerate(zip(backends, eps, seps, strict=True)):
        matches = [comment(f"{spn} -> {ep}")]
        if i < len(backends) - 1:
            matches.append(f"-m statistic --mode random --probability "
                           f"{probability(b.weight / remaining)}")
        remaining -= b.weight
        out.append(rule(chain, matches=matches, target=sep))
    return out


@dataclass
class PortPlan:
    """What one service port's frontends mean for its rules (kube-proxy's
    per-service-port variables in syncProxyRules)."""

    spn: str
    proto: str
    svc: str
    svl: str
    ext: str
    fw: str
    cluster_ip: Frontend | None
    external: list[Frontend]
    node_ports: list[Frontend]
    ext_ips: list[Frontend]
    lbs: list[Frontend]
    cluster_eps: tuple[Backend, ...]
    local_eps: tuple[Backend, ...]
    reachable: dict[tuple[str, int], Backend]
    has_endpoints: bool
    has_internal: bool
    has_external: bool
    uses_svc: bool
    uses_svl: bool
    internal_chain: str
    external_local: bool
    uses_ext: bool
    sources: list[str]
    uses_fw: bool
    affinity: int
    #: where traffic without a usable endpoint goes, and the comment saying why
    filter_target: str
    filter_comment: str


_NO_ENDPOINTS: frozenset[str] = frozenset()


def udp_endpoints(pp: PortPlan) -> frozenset[str]:
    """The endpoint IPs a UDP service port reaches, for conntrack cleanup
    (clear_stale_udp); empty for TCP and SCTP, which need none: the set costs
    ~600 bytes per service port, 6 MB at 10,000 Services."""
    if pp.proto != "udp":
        return _NO_ENDPOINTS
    return frozenset(b.address for b in pp.reachable.values())


def _endpoints_by_policy(frontends: Sequence[Frontend]
                         ) -> tuple[tuple[Backend, ...], tuple[Backend, ...], bool, bool]:
    """(cluster endpoints, local endpoints, cluster chain used, local chain used)."""
    cluster_eps: tuple[Backend, ...] = ()
    local_eps: tuple[Backend, ...] = ()
    uses_cluster = uses_local = False
    for f in frontends:
        if f.traffic_policy == "Local":
            uses_local = True
            local_eps = local_eps or _live(f.backends)
            if f.cluster_backends:
                uses_cluster = True
                cluster_eps = cluster_eps or _live(f.cluster_backends)
        else:
            uses_cluster = True
            cluster_eps = cluster_eps or _live(f.backends)
    return cluster_eps, local_eps, uses_cluster, uses_local


def port_plan(frontends: Sequence[Frontend], opts: RuleOptions) -> PortPlan:
    first = frontends[0]
    spn = first.service
    proto = first.protocol.lower()
    suffix = chain_suffix(spn, proto)
    svc, svl, ext, fw = (f"KUBE-{k}-{suffix}" for k in ("SVC", "SVL", "EXT", "FW"))
    cluster_ip = next((f for f in frontends if f.kind == FrontendKind.CLUSTER_IP), None)
    external = [f for f in frontends if f.kind != FrontendKind.CLUSTER_IP]
    lbs = [f for f in external if f.kind == FrontendKind.LOAD_BALANCER]
    cluster_eps, local_eps, uses_cluster, uses_local = _endpoints_by_policy(frontends)
    internal_local = cluster_ip is not None and cluster_ip.traffic_policy == "Local"
    external_local = any(f.traffic_policy == "Local" for f in external)
    reachable = {(b.address, b.port): b for b in (*cluster_eps, *local_eps)}
    has_endpoints = bool(reachable) or any(f.any_endpoints for f in frontends)
    sources = [r for f in lbs for r in f.source_ranges]
    if has_endpoints:
        filter_target, filter_comment = "DROP", f"{spn} has no local endpoints"
    else:
        filter_target, filter_comment = opts.reject(), f"{spn} has no endpoints"
    return PortPlan(
        spn=spn, proto=proto, svc=svc, svl=svl, ext=ext, fw=fw, cluster_ip=cluster_ip,
        external=external, node_ports=[f for f in external if f.kind == FrontendKind.NODE_PORT],
        ext_ips=[f for f in external if f.kind == FrontendKind.EXTERNAL_IP], lbs=lbs,
        cluster_eps=cluster_eps, local_eps=local_eps, reachable=reachable,
        has_endpoints=has_endpoints,
        has_internal=bool(local_eps) if internal_local else has_endpoints,
        has_external=bool(local_eps) if external_local else has_endpoints,
        uses_svc=bool(cluster_eps) and uses_cluster, uses_svl=bool(local_eps) and uses_local,
        internal_chain=svl if internal_local else svc, external_local=external_local,
        uses_ext=has_endpoints and bool(external), sources=sources,
        uses_fw=has_endpoints and bool(lbs) and bool(sources),
        affinity=first.persistence_timeout, filter_target=filter_target,
        filter_comment=filter_comment)


def _reject_external(pp: PortPlan, f: Frontend) -> str:
    return rule("KUBE-EXTERNAL-SERVICES", dst=host(f.address), proto=pp.proto,
                matches=[comment(pp.filter_comment), port_match(pp.proto, f.port)],
                target=pp.filter_target)


def _fragments(pp: PortPlan, health_check_node_port: int) -> dict[ChainKey, tuple[str, ...]]:
    """The service port's rules in the shared top-level chains."""
    proto, spn, pm = pp.proto, pp.spn, port_match
    nat_svc: list[str] = []
    f_svc: list[str] = []
    f_ext: list[str] = []
    f_fw: list[str] = []
    if pp.cluster_ip is not None:
        args = dict(dst=host(pp.cluster_ip.address), proto=proto)
        if pp.has_internal:
            nat_svc.append(rule("KUBE-SERVICES", **args, matches=[
                comment(f"{spn} cluster IP"), pm(proto, pp.cluster_ip.port)],
                target=pp.internal_chain))
        else:
            f_svc.append(rule("KUBE-SERVICES", **args, matches=[
                comment(pp.filter_comment), pm(proto, pp.cluster_ip.port)],
                target=pp.filter_target))
    for f in pp.ext_ips:
        if pp.has_endpoints:
            nat_svc.append(rule("KUBE-SERVICES", dst=host(f.address), proto=proto, matches=[
                comment(f"{spn} external IP"), pm(proto, f.port)], target=pp.ext))
        if not pp.has_external:
            f_ext.append(_reject_external(pp, f))
    for f in pp.lbs:
        if pp.has_endpoints:
            nat_svc.append(rule("KUBE-SERVICES", dst=host(f.address), proto=proto, matches=[
                comment(f"{spn} loadbalancer IP"), pm(proto, f.port)],
                target=pp.fw if pp.uses_fw else pp.ext))
        if pp.uses_fw:
            f_fw.append(rule("KUBE-PROXY-FIREWALL", dst=host(f.address), proto=proto, matches=[
                comment(f"{spn} traffic not accepted by {pp.fw}"), pm(proto, f.port)],
                target="DROP"))
    if not pp.has_external:
        f_ext += [_reject_external(pp, f) for f in pp.lbs]
    nat_np, f_np = _node_port_fragments(pp, health_check_node_port, f_ext)
    fragments = {
        ("nat", "KUBE-SERVICES"): tuple(nat_svc),
        ("nat", "KUBE-NODEPORTS"): tuple(nat_np),
        ("filter", "KUBE-SERVICES"): tuple(f_svc),
        ("filter", "KUBE-EXTERNAL-SERVICES"): tuple(f_ext),
        ("filter", "KUBE-NODEPORTS"): tuple(f_np),
        ("filter", "KUBE-PROXY-FIREWALL"): tuple(f_fw),
    }
    return {k: v for k, v in fragments.items() if v}


def _node_port_fragments(pp: PortPlan, health_check_node_port: int, f_ext: list[str]
                         ) -> tuple[list[str], list[str]]:
    """nat and filter KUBE-NODEPORTS rules (a refused NodePort joins `f_ext`)."""
    proto, spn, pm = pp.proto, pp.spn, port_match
    nat_np: list[str] = []
    f_np: list[str] = []
    node_port = pp.node_ports[0].port if pp.node_ports else 0
    if node_port:
        if pp.has_endpoints:
            nat_np.append(rule("KUBE-NODEPORTS", proto=proto, matches=[
                comment(spn), pm(proto, node_port)], target=pp.ext))
        if not pp.has_external:
            f_ext.append(rule("KUBE-EXTERNAL-SERVICES", proto=proto, matches=[
                comment(pp.filter_comment), "-m addrtype --dst-type LOCAL",
                pm(proto, node_port)], target=pp.filter_target))
    if health_check_node_port:
        f_np.append(rule("KUBE-NODEPORTS", proto="tcp", matches=[
            comment(f"{spn} health check node port"), pm("tcp", health_check_node_port)],
            target="ACCEPT"))
    return nat_np, f_np


def _ext_chain(pp: PortPlan, opts: RuleOptions) -> list[str]:
    spn, ext, svc = pp.spn, pp.ext, pp.svc
    rules: list[str] = []
    if not pp.external_local:
        rules.append(rule(ext, matches=[
            comment(f"masquerade traffic for {spn} external destinations")],
            target="KUBE-MARK-MASQ"))
    elif pp.uses_svc:
        # Pods and the node itself may use any endpoint; only traffic from
        # outside is restricted to local endpoints (and keeps its source IP).
        if opts.local_detector is not None:
            rules.append(rule(ext, **opts.if_local(), matches=[
                comment(f"pod traffic for {spn} external destinations")], target=svc))
        rules.append(rule(ext, matches=[
            comment(f"masquerade LOCAL traffic for {spn} external destinations"),
            "-m addrtype --src-type LOCAL"], target="KUBE-MARK-MASQ"))
        rules.append(rule(ext, matches=[
            comment(f"route LOCAL traffic for {spn} external destinations"),
            "-m addrtype --src-type LOCAL"], target=svc))
    if pp.has_external:
        rules.append(rule(ext, target=pp.svl if pp.external_local else svc))
    return rules


def _fw_chain(pp: PortPlan, opts: RuleOptions) -> list[str]:
    spn, fw = pp.spn, pp.fw
    rules = [rule(fw, src=str(ipaddress.ip_network(cidr)),
                  matches=[comment(f"{spn} loadbalancer IP")], target=pp.ext)
             for cidr in pp.sources]
    node_ip = opts.node_ip
    if node_ip and any(ipaddress.ip_address(node_ip) in ipaddress.ip_network(c)
                       for c in pp.sources):
        for f in pp.lbs:
            rules.append(rule(fw, src=host(f.address),
                              matches=[comment(f"{spn} loadbalancer IP")], target=pp.ext))
    rules.append(rule(fw, matches=[
        comment(f"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL")]))
    return rules


def _svc_chain(pp: PortPlan, opts: RuleOptions) -> list[str]:
    rules: list[str] = []
    if pp.cluster_ip is not None:
        args = dict(dst=host(pp.cluster_ip.address), proto=pp.proto)
        masq = [comment(f"{pp.spn} cluster IP"), port_match(pp.proto, pp.cluster_ip.port)]
        if opts.masquerade_all:
            rules.append(rule(pp.svc, **args, matches=masq, target="KUBE-MARK-MASQ"))
        elif opts.local_detector is not None:
            rules.append(rule(pp.svc, **opts.if_not_local(), **args, matches=masq,
                              target="KUBE-MARK-MASQ"))
    return rules + _endpoint_rules(pp.svc, pp.spn, pp.proto, pp.cluster_eps, pp.affinity, opts)


def _endpoint_chains(pp: PortPlan, opts: RuleOptions) -> dict[ChainKey, list[str]]:
    chains: dict[ChainKey, list[str]] = {}
    proto, spn = pp.proto, pp.spn
    for b in pp.reachable.values():
        ep = host_port(b.address, b.port)
        sep = endpoint_chain(spn, proto, ep)
        dnat = [comment(spn)]
        if pp.affinity:
            dnat.append(f"-m recent --set --name {sep} --mask {opts.recent_mask()} --rsource")
        dnat.append(f"-m {proto}")
        chains[("nat", sep)] = [
            rule(sep, src=host(b.address), matches=[comment(spn)], target="KUBE-MARK-MASQ"),
            rule(sep, proto=proto, matches=dnat, target=f"DNAT --to-destination {ep}"),
        ]
    return chains


def service_port_rules(frontends: Sequence[Frontend], health_check_node_port: int,
                       opts: RuleOptions) -> ServicePortRules:
    """kube-proxy's per-service-port block of syncProxyRules, for the frontends of
    one service port in one family."""
    pp = port_plan(frontends, opts)
    chains: dict[ChainKey, list[str]] = {}
    if pp.uses_ext:
        chains[("nat", pp.ext)] = _ext_chain(pp, opts)
    if pp.uses_fw:
        chains[("nat", pp.fw)] = _fw_chain(pp, opts)
    if pp.uses_svc:
        chains[("nat", pp.svc)] = _svc_chain(pp, opts)
    if pp.uses_svl:
        chains[("nat", pp.svl)] = _endpoint_rules(pp.svl, pp.spn, pp.proto, pp.local_eps,
                                                  pp.affinity, opts)
    chains.update(_endpoint_chains(pp, opts))
    udp = tuple((f.address, f.port) for f in frontends) if pp.proto == "udp" else ()
    return ServicePortRules(chains={k: tuple(v) for k, v in chains.items()},
                            fragments=_fragments(pp, health_check_node_port),
                            udp_targets=udp, endpoints=udp_endpoints(pp))


def nodeports_jump(opts: RuleOptions) -> tuple[str, ...]:
    """The last rule of nat KUBE-SERVICES: local destinations go on to
    KUBE-NODEPORTS. Loopback is left out for IPv6 (NodePorts never work on ::1)
    and for IPv4 without localhostNodePorts, as kube-proxy does."""
    if opts.node_port_addresses is None:
        not_dst = "::1/128" if opts.family == 6 else (
            None if opts.localhost_node_ports else "127.0.0.0/8")
        return (rule("KUBE-SERVICES", not_dst=not_dst,
                     matches=[comment(NODEPORTS_COMMENT), "-m addrtype --dst-type LOCAL"],
                     target="KUBE-NODEPORTS"),)
    return tuple(rule("KUBE-SERVICES", dst=host(a), matches=[comment(NODEPORTS_COMMENT)],
                      target="KUBE-NODEPORTS") for a in opts.node_port_addresses)
