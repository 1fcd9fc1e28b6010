"""kube-proxy IPVS mode's ipsets and iptables helper rules
(kube-proxy's pkg/proxy/ipvs/proxier.go and ipset.go), rendered from the plan.

The sets say which VIP:port pairs exist; the rules use them for masquerade
(off-cluster clients, NodePorts, LoadBalancers, hairpin), LoadBalancer source
ranges and the filter that stops a VIP from exposing arbitrary node ports.
Rules are rendered in iptables-save's canonical text (as the iptables
datapath's are), so they are compared with the kernel line by line and only
chains that differ are written. Sets are created with `ipset restore`; their
members are diffed one by one and written through netlink (svcproxy.plugins.kernel.ipset).
"""

from __future__ import annotations

import builtins
import ipaddress
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from svcproxy.ir import Frontend, FrontendKey, FrontendKind, ServiceMap
from svcproxy.plugins.iptables.rules import JUMPS as IPTABLES_JUMPS
from svcproxy.plugins.iptables.rules import (
    ChainKey,
    RuleOptions,
    comment,
    host,
    rule,
    static_chains,
)
from svcproxy.plugins.iptables.rules import is_owned as iptables_owned
from svcproxy.plugins.kernel.ipset import SetSpec

#: name -> (type, comment) for IPv4; IPv6 names are "KUBE-6-..." (31 chars max)
SETS: dict[str, tuple[str, str]] = {
    "KUBE-LOOP-BACK": ("hash:ip,port,ip",
                       "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    "KUBE-CLUSTER-IP": ("hash:ip,port",
                        "Kubernetes service cluster ip + port for masquerade purpose"),
    "KUBE-EXTERNAL-IP": ("hash:ip,port",
                         "Kubernetes service external ip + port for masquerade and filter "
                         "purpose"),
    "KUBE-EXTERNAL-IP-LOCAL": ("hash:ip,port", "Kubernetes service external ip + port with "
                                               "externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER": ("hash:ip,port", "Kubernetes service lb portal"),
    "KUBE-LOAD-BALANCER-LOCAL": ("hash:ip,port", "Kubernetes service load balancer ip + port "
                                                 "with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER-FW": ("hash:ip,port", "Kubernetes service load balancer ip + port "
                                              "for load balancer with sourceRange"),
    "KUBE-LOAD-BALANCER-SOURCE-IP": ("hash:ip,port,ip", "Kubernetes service load balancer ip "
                                     "+ port + source IP for packet filter purpose"),
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": ("hash:ip,port,net", "Kubernetes service load balancer "
                                       "ip + port + source cidr for packet filter purpose"),
    "KUBE-NODE-PORT-TCP": ("bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-TCP": ("bitmap:port", "Kubernetes nodeport TCP port with "
                                                "externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-UDP": ("bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-UDP": ("bitmap:port", "Kubernetes nodeport UDP port with "
                                                "externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port for masquerade "
                                                 "purpose with type 'hash ip:port'"),
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port with "
                                       "externalTrafficPolicy=local with type 'hash ip:port'"),
    "KUBE-HEALTH-CHECK-NODE-PORT": ("bitmap:port", "Kubernetes health check node port"),
    "KUBE-IPVS-IPS": ("hash:ip", "Addresses on the ipvs interface"),
}

NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER",
              "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL",
                 "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")

JUMPS: tuple[tuple[str, str, str], ...] = (
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" '
                           '-j KUBE-POSTROUTING'),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("filter", "INPUT", '-m comment --comment "kubernetes health check rules" '
                        '-j KUBE-NODE-PORT'),
    ("filter", "INPUT", '-m comment --comment "kube-proxy firewall rules" '
                        '-j KUBE-PROXY-FIREWALL'),
    ("filter", "FORWARD", '-m comment --comment "kube-proxy firewall rules" '
                          '-j KUBE-PROXY-FIREWALL'),
    ("filter", "INPUT", '-m comment --comment "kubernetes ipvs access filter" '
                        '-j KUBE-IPVS-FILTER'),
    ("filter", "OUTPUT", '-m comment --comment "kubernetes ipvs access filter" '
                         '-j KUBE-IPVS-OUT-FILTER'),
)


def iptables_mode_leftovers(chains: Mapping[tuple[str, str], Sequence[str]]
                            ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """kube-proxy iptables mode's chains and jumps that IPVS mode does not have
    (its per-service chains, filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
    KUBE-NODEPORTS, nat KUBE-NODEPORTS), among `chains` (iptables-save's, by
    (table, chain)): what a node taken over from iptables mode keeps after
    the IPVS datapath serves. Shared chains (KUBE-SERVICES in nat,
    KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-FORWARD, KUBE-PROXY-FIREWALL) are
    IPVS mode's too; KUBE-FIREWALL may be kubelet's: neither is here."""
    ours = {("nat", c) for c in NAT_CHAINS} | {("filter", c) for c in FILTER_CHAINS}
    chains_out = sorted(k for k in chains if iptables_owned(*k) and k not in ours)
    bodies = {(t, c, b) for t, c, b in JUMPS}
    jumps_out = [(t, c, b) for t, c, b in IPTABLES_JUMPS
                 if (t, c, b) not in bodies and f"-A {c} {b}" in chains.get((t, c), ())]
    return chains_out, jumps_out


def set_name(name: str, family: int) -> str:
    return name if family == 4 else ("KUBE-6-" + name[len("KUBE-"):])[:31]


#: family set name -> base name (IPv6 names may be truncated to ipset's 31
#: characters, so the prefix cannot simply be swapped back)
_BASES = {set_name(base, fam): base for base in SETS for fam in (4, 6)}


def is_owned(table: str, chain: str) -> bool:
    return chain in (NAT_CHAINS if table == "nat" else FILTER_CHAINS if table == "filter"
                     else ())


@dataclass(frozen=True)
class HelperOptions:
    family: int = 4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: tuple[str, str] | None = None  # ("-s", cidr) or ("-i", name)
    node_ip: str | None = None




def frontend_entries(fe: Frontend, node: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                     bound: bool) -> tuple[tuple[tuple[str, str], ...],
                                           tuple[str, str, int] | None]:
    """The (set, member) pairs one frontend contributes (base set names), and its
    KUBE-IPVS-OUT-FILTER entry (a LoadBalancer whose source ranges exclude the
    node) if any. `bound`: its address is on kube-ipvs0."""
    out: list[tuple[str, str]] = []
    out_filter = None
    proto = fe.protocol.lower()
    ipport = f"{fe.address},{proto}:{fe.port}"
    local = fe.traffic_policy == "Local"
    for b in (*fe.backends, *fe.cluster_backends):
        if b.local:
            out.append(("KUBE-LOOP-BACK", f"{b.address},{proto}:{b.port},{b.address}"))
    if fe.kind == FrontendKind.CLUSTER_IP:
        out.append(("KUBE-CLUSTER-IP", ipport))
    elif fe.kind == FrontendKind.EXTERNAL_IP:
        out.append(("KUBE-EXTERNAL-IP-LOCAL" if local else "KUBE-EXTERNAL-IP", ipport))
    elif fe.kind == FrontendKind.LOAD_BALANCER:
        out.append(("KUBE-LOAD-BALANCER", ipport))
        if local:
            out.append(("KUBE-LOAD-BALANCER-LOCAL", ipport))
        if fe.source_ranges:
            out.append(("KUBE-LOAD-BALANCER-FW", ipport))
            nets = [ipaddress.ip_network(c) for c in fe.source_ranges]
            for net in nets:
                out.append(("KUBE-LOAD-BALANCER-SOURCE-CIDR", f"{ipport},{net}"))
            if node is not None and any(node in n for n in nets):
                out.append(("KUBE-LOAD-BALANCER-SOURCE-IP", f"{ipport},{fe.address}"))
            else:
                out_filter = (fe.address, proto, fe.port)
    elif fe.kind == FrontendKind.NODE_PORT:
        if proto == "sctp":
            out.append(("KUBE-NODE-PORT-LOCAL-SCTP-HASH" if local else
                        "KUBE-NODE-PORT-SCTP-HASH", ipport))
            if local:
                out.append(("KUBE-NODE-PORT-SCTP-HASH", ipport))
        else:
            suffix = proto.upper()
            out.append((f"KUBE-NODE-PORT-{suffix}", str(fe.port)))
            if local:
                out.append((f"KUBE-NODE-PORT-LOCAL-{suffix}", str(fe.port)))
    if bound:
        out.append(("KUBE-IPVS-IPS", fe.address))
    return tuple(out), out_filter


def health_check_entries(plan: ServiceMap) -> set[str]:
    return {str(s.health_check_node_port) for s in plan.services.values()
            if s.health_check_node_port}


class SetIndex:
    """Set members counted by the frontends that contribute them, so a partial
    sync finds the members to add and delete from the changed frontends alone
    (a member shared by two frontends stays until both are gone)."""

    def __init__(self) -> None:
        self.contrib: dict[FrontendKey, tuple[tuple[str, str], ...]] = {}
        self.refs: dict[tuple[str, str], int] = {}
        self.out_filter: dict[FrontendKey, tuple[str, str, int]] = {}

    def set(self, key: FrontendKey, entries: tuple[tuple[str, str], ...],
            out_filter: tuple[str, str, int] | None,
            added: list[tuple[str, str]], removed: list[tuple[str, str]]) -> None:
        """Replace `key`'s contribution; members that appear or disappear are
        appended to `added` / `removed`. Only the net change: a member `key`
        keeps (or that another frontend still holds) is in neither list, so
        nothing touches it in the kernel."""
        old = self.contrib.pop(key, ())
        if old == entries:
            if entries:
                self.contrib[key] = entries
        else:
            refs = self.refs
            # count the new contribution in before the old one out, so a member
            # in both never reaches zero on the way
            for e in entries:
                n = refs.get(e, 0)
                refs[e] = n + 1
                if not n:
                    added.append(e)
            for e in old:
                n = refs[e] - 1
                if n:
                    refs[e] = n
                else:
                    del refs[e]
                    removed.append(e)
            if entries:
                self.contrib[key] = entries
        if out_filter is None:
            self.out_filter.pop(key, None)
        else:
            self.out_filter[key] = out_filter

    def members(self) -> dict[str, builtins.set[str]]:
        out: dict[str, builtins.set[str]] = {name: builtins.set() for name in SETS}
        for name, member in self.refs:
            out[name].add(member)
        return out


def net_changes(added: list[tuple[str, str]], removed: list[tuple[str, str]]
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What to add and delete after several SetIndex.set calls in one sync: a
    member one frontend gave up and another took (or the reverse) stays as it
    is in the kernel, so it is in neither list."""
    if not added or not removed:
        return added, removed
    count = Counter(added)
    count.subtract(removed)
    adds = [e for e in dict.fromkeys(added) if count[e] > 0]
    dels = [e for e in dict.fromkeys(removed) if count[e] < 0]
    return adds, dels


def set_entries(plan: ServiceMap, bound: set[str], family: int,
                node_ip: str | None) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Members of every set (family names), and the LoadBalancer (ip, proto, port)
    whose source ranges exclude the node (they get a KUBE-IPVS-OUT-FILTER DROP)."""
    node = ipaddress.ip_address(node_ip) if node_ip else None
    index = SetIndex()
    sink: list[tuple[str, str]] = []
    for fe in plan.frontends.values():
        if fe.family == family:
            index.set(fe.key, *frontend_entries(fe, node, fe.address in bound), sink, sink)
    entries = index.members()
    entries["KUBE-HEALTH-CHECK-NODE-PORT"] = health_check_entries(plan)
    return ({set_name(k, family): v for k, v in entries.items()},
            sorted(set(index.out_filter.values())))


def vip_source_rule(family: int) -> str:
    """Masquerade node-originated connections whose source is a service VIP (the
    kernel picks a VIP bound to kube-ipvs0 as the source of a connection to that
    VIP): the backend may be on another node, whose kube-ipvs0 holds the same
    VIP and would keep the reply. Written before anything else at start-up."""
    return rule("KUBE-POSTROUTING", matches=[
        comment("svcproxy: node traffic from a service VIP"),
        f"-m set --match-set {set_name('KUBE-IPVS-IPS', family)} src"], target="MASQUERADE")


class _Sets:
    """Which of the family's sets are empty, and their match rules."""

    def __init__(self, entries: Mapping[str, Collection[str] | int], family: int) -> None:
        self.entries = entries
        self.family = family

    def name(self, base: str) -> str:
        return set_name(base, self.family)

    def has(self, base: str) -> bool:
        return bool(self.entries.get(self.name(base)))

    def match(self, base: str, flags: str) -> list[str]:
        return [comment(SETS[base][1]), f"-m set --match-set {self.name(base)} {flags}"]


def _cluster_ip_masquerade(sets: _Sets, opts: HelperOptions) -> list[str]:
    if not sets.has("KUBE-CLUSTER-IP"):
        return []
    if opts.masquerade_all:
        return [rule("KUBE-SERVICES", matches=sets.match("KUBE-CLUSTER-IP", "dst,dst"),
                     target="KUBE-MARK-MASQ")]
    if opts.local_detector is not None:
        kind, value = opts.local_detector
        args = {"not_src": value} if kind == "-s" else {"not_iface": value}
        return [rule("KUBE-SERVICES", **args, matches=sets.match("KUBE-CLUSTER-IP", "dst,dst"),
                     target="KUBE-MARK-MASQ")]
    return [rule("KUBE-SERVICES", matches=sets.match("KUBE-CLUSTER-IP", "src,dst"),
                 target="KUBE-MARK-MASQ")]


def _nat_services(sets: _Sets, opts: HelperOptions) -> tuple[str, ...]:
    out = [rule("KUBE-SERVICES", src="127.0.0.0/8" if opts.family == 4 else "::1/128",
                target="RETURN")]
    if sets.has("KUBE-LOAD-BALANCER"):
        out.append(rule("KUBE-SERVICES", matches=sets.match("KUBE-LOAD-BALANCER", "dst,dst"),
                        target="KUBE-LOAD-BALANCER"))
    out += _cluster_ip_masquerade(sets, opts)
    for name, masq in (("KUBE-EXTERNAL-IP", True), ("KUBE-EXTERNAL-IP-LOCAL", False)):
        if not sets.has(name):
            continue
        if masq:
            out.append(rule("KUBE-SERVICES", matches=sets.match(name, "dst,dst"),
                            target="KUBE-MARK-MASQ"))
        out.append(rule("KUBE-SERVICES", matches=[
            *sets.match(name, "dst,dst"), "-m physdev ! --physdev-is-in",
            "-m addrtype ! --src-type LOCAL"], target="ACCEPT"))
        out.append(rule("KUBE-SERVICES", matches=[
            *sets.match(name, "dst,dst"), "-m addrtype --dst-type LOCAL"], target="ACCEPT"))
    out.append(rule("KUBE-SERVICES", matches=["-m addrtype --dst-type LOCAL"],
                    target="KUBE-NODE-PORT"))
    # "accept IPVS traffic", last: kube-proxy's acceptIPVSTraffic writes these
    # without a comment (a node taken over keeps its chain unchanged)
    for name in ("KUBE-CLUSTER-IP", "KUBE-LOAD-BALANCER"):
        if sets.has(name):
            out.append(rule("KUBE-SERVICES",
                            matches=[f"-m set --match-set {sets.name(name)} dst,dst"],
                            target="ACCEPT"))
    return tuple(out)


def _nat_node_port(sets: _Sets) -> tuple[str, ...]:
    out = []
    for proto in ("tcp", "udp"):
        up = proto.upper()
        if sets.has(f"KUBE-NODE-PORT-LOCAL-{up}"):
            out.append(rule("KUBE-NODE-PORT", proto=proto,
                            matches=sets.match(f"KUBE-NODE-PORT-LOCAL-{up}", "dst"),
                            target="RETURN"))
        if sets.has(f"KUBE-NODE-PORT-{up}"):
            out.append(rule("KUBE-NODE-PORT", proto=proto,
                            matches=sets.match(f"KUBE-NODE-PORT-{up}", "dst"),
                            target="KUBE-MARK-MASQ"))
    if sets.has("KUBE-NODE-PORT-LOCAL-SCTP-HASH"):
        out.append(rule("KUBE-NODE-PORT", proto="sctp",
                        matches=sets.match("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "dst,dst"),
                        target="RETURN"))
    if sets.has("KUBE-NODE-PORT-SCTP-HASH"):
        out.append(rule("KUBE-NODE-PORT", proto="sctp",
                        matches=sets.match("KUBE-NODE-PORT-SCTP-HASH", "dst,dst"),
                        target="KUBE-MARK-MASQ"))
    return tuple(out)


def _filter_chains(sets: _Sets, out_filter: list[tuple[str, str, int]], family: int
                   ) -> dict[ChainKey, tuple[str, ...]]:
    f_np = [rule("KUBE-NODE-PORT", matches=sets.match("KUBE-HEALTH-CHECK-NODE-PORT", "dst"),
                 target="ACCEPT")]
    f_fw = []
    if sets.has("KUBE-LOAD-BALANCER-FW"):
        f_fw.append(rule("KUBE-PROXY-FIREWALL",
                         matches=sets.match("KUBE-LOAD-BALANCER-FW", "dst,dst"),
                         target="KUBE-SOURCE-RANGES-FIREWALL"))
    f_src = [rule("KUBE-SOURCE-RANGES-FIREWALL", matches=sets.match(name, "dst,dst,src"),
                  target="RETURN")
             for name in ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-LOAD-BALANCER-SOURCE-IP")
             if sets.has(name)]
    f_src.append(rule("KUBE-SOURCE-RANGES-FIREWALL", target="DROP"))
    # kube-proxy writes KUBE-IPVS-FILTER's rules without comments
    f_ipvs = [rule("KUBE-IPVS-FILTER", matches=[f"-m set --match-set {sets.name(name)} dst,dst"],
                   target="RETURN")
              for name in ("KUBE-LOAD-BALANCER", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP",
                           "KUBE-EXTERNAL-IP-LOCAL")]
    f_ipvs.append(rule("KUBE-IPVS-FILTER", matches=[
        f"-m set --match-set {sets.name('KUBE-HEALTH-CHECK-NODE-PORT')} dst"], target="RETURN"))
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    f_ipvs.append(rule("KUBE-IPVS-FILTER", matches=[
        "-m conntrack --ctstate NEW",
        f"-m set --match-set {sets.name('KUBE-IPVS-IPS')} dst"],
        target=f"REJECT --reject-with {reject}"))
    f_out = [rule("KUBE-IPVS-OUT-FILTER", src=host(ip), matches=[
        f"-m ipvs --vaddr {host(ip)} --vproto {proto} --vport {port}"], target="DROP")
        for ip, proto, port in out_filter]
    return {
        ("filter", "KUBE-NODE-PORT"): tuple(f_np),
        ("filter", "KUBE-PROXY-FIREWALL"): tuple(f_fw),
        ("filter", "KUBE-SOURCE-RANGES-FIREWALL"): tuple(f_src),
        ("filter", "KUBE-IPVS-FILTER"): tuple(f_ipvs),
        ("filter", "KUBE-IPVS-OUT-FILTER"): tuple(f_out),
    }


def helper_chains(entries: Mapping[str, Collection[str] | int],
                  out_filter: list[tuple[str, str, int]],
                  opts: HelperOptions) -> dict[ChainKey, tuple[str, ...]]:
    """kube-proxy IPVS mode's chains; rules that use a set only when it is not
    empty, as kube-proxy writes them. `entries`: each set's members (or just
    how many), by the family's set name."""
    fam = opts.family
    sets = _Sets(entries, fam)
    nat_lb = []
    if sets.has("KUBE-LOAD-BALANCER-LOCAL"):
        nat_lb.append(rule("KUBE-LOAD-BALANCER",
                           matches=sets.match("KUBE-LOAD-BALANCER-LOCAL", "dst,dst"),
                           target="RETURN"))
    nat_lb.append(rule("KUBE-LOAD-BALANCER", target="KUBE-MARK-MASQ"))
    # the mark and masquerade chains are the iptables datapath's; IPVS mode's
    # KUBE-FORWARD has no conntrack-INVALID drop (as with tcpBeLiberal)
    static = static_chains(RuleOptions(family=fam, masquerade_bit=opts.masquerade_bit,
                                       tcp_be_liberal=True))
    post = [vip_source_rule(fam)]
    if sets.has("KUBE-LOOP-BACK"):
        post.append(rule("KUBE-POSTROUTING", matches=sets.match("KUBE-LOOP-BACK",
                                                                "dst,dst,src"),
                         target="MASQUERADE"))
    post += static[("nat", "KUBE-POSTROUTING")]
    return {
        ("nat", "KUBE-SERVICES"): _nat_services(sets, opts),
        ("nat", "KUBE-POSTROUTING"): tuple(post),
        ("nat", "KUBE-NODE-PORT"): _nat_node_port(sets),
        ("nat", "KUBE-LOAD-BALANCER"): tuple(nat_lb),
        ("nat", "KUBE-MARK-MASQ"): static[("nat", "KUBE-MARK-MASQ")],
        ("filter", "KUBE-FORWARD"): static[("filter", "KUBE-FORWARD")],
        **_filter_chains(sets, out_filter, fam),
    }


def set_specs(names: list[str], family: int) -> list[SetSpec]:
    """These sets as kube-proxy creates them (hash sets: hashsize 1024, maxelem
    65536; port bitmaps: every port); created over netlink, members too
    (svcproxy.plugins.kernel.ipset)."""
    return [SetSpec(name, SETS.get(_BASES.get(name, name), ("hash:ip,port", ""))[0], family)
            for name in names]


def ipset_create(names: list[str], family: int) -> str:
    """The same as `ipset restore` input (-exist)."""
    return "".join(spec.text() + "\n" for spec in set_specs(names, family))
