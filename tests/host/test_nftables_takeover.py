"""Taking over a node that kube-proxy's nftables mode programmed, in place.

The node's table is kube-proxy's own layout (pkg/proxy/nftables: an endpoint
chain per endpoint, an anonymous `numgen ... vmap` per service, a masquerade
rule per service), written by the test with `nft -f` for the cluster as
kube-proxy last saw it: web -> a, b and dns -> u. With TCP connections and UDP
flows held through a ClusterIP and a NodePort, svcproxy's first sync turns the
table into its own (the base chains and maps are the same, so it is repaired,
not rebuilt), every held flow answers from its first backend, new connections
reach the endpoint kube-proxy had not seen (c), and kube-proxy's endpoint
chains are flushed and then deleted."""

from __future__ import annotations

from conftest import NODE_IP, Node
from factories import endpoint, service, slice_
from netns import Topology, sh

from svcproxy.plugins.kernel.nftables import parse_table
from svcproxy.plugins.nftables.rules import endpoint_base, port_chain_base

WEB_VIP, DNS_VIP = "10.96.0.10", "10.96.0.53"
WEB = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
PODS = {"a": "10.244.1.11", "b": "10.244.2.12", "c": "10.244.3.13", "u": "10.244.1.53"}
TCP_FLOWS = {"cluster-ip": (WEB_VIP, 80), "node-port": (NODE_IP, 30080)}
UDP_FLOWS = {"udp-cluster-ip": (DNS_VIP, 53), "udp-node-port": (NODE_IP, 30053)}


def kube_proxy_table() -> str:
    """kube-proxy nftables mode's transaction for web -> a, b and dns -> u
    (its setupNFTables and syncProxyRules, in its own spelling)."""
    t = "ip kube-proxy"
    out = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']
    for name, kind, hook, prio in (
            ("filter-prerouting", "filter", "prerouting", -110),
            ("filter-input", "filter", "input", -110),
            ("filter-forward", "filter", "forward", -110),
            ("filter-output", "filter", "output", -110),
            ("filter-output-post-dnat", "filter", "output", -90),
            ("nat-prerouting", "nat", "prerouting", -100), ("nat-output", "nat", "output", -100),
            ("nat-postrouting", "nat", "postrouting", 100)):
        out.append(f"add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}")
    for name in ("nodeport-endpoints-check", "service-endpoints-check", "firewall-check",
                 "services", "masquerading", "cluster-ips-check", "mark-for-masquerade"):
        out.append(f"add chain {t} {name}")
    out.append(f'add chain {t} reject-chain {{ comment "helper for @no-endpoint-services / '
               '@no-endpoint-nodeports" ; }')
    for target, source in (("nodeport-endpoints-check", "filter-input"),
                           ("service-endpoints-check", "filter-input"),
                           ("service-endpoints-check", "filter-forward"),
                           ("service-endpoints-check", "filter-output"),
                           ("firewall-check", "filter-prerouting"),
                           ("firewall-check", "filter-output")):
        out.append(f"add rule {t} {source} ct state new jump {target}")
    out += [f"add rule {t} nat-output jump services", f"add rule {t} nat-prerouting jump services",
            f"add rule {t} nat-postrouting jump masquerading",
            f"add rule {t} filter-forward ct state new jump cluster-ips-check",
            f"add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check",
            f"add rule {t} mark-for-masquerade mark set mark or 0x4000",
            f"add rule {t} masquerading mark and 0x4000 == 0 return",
            f"add rule {t} masquerading mark set mark xor 0x4000",
            f"add rule {t} masquerading masquerade fully-random",
            f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
            f'add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment '
            '"Reject traffic to invalid ports of ClusterIPs"',
            f"add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : "
            'verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }',
            f"add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; "
            'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
            f"add rule {t} reject-chain reject",
            f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap "
            "@no-endpoint-services",
            f"add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . "
            "th dport vmap @no-endpoint-nodeports",
            f"add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
            'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
            f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
            f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
            'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
            f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; "
            'comment "NodePort traffic" ; }',
            f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
            f"add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . "
            "th dport vmap @service-nodeports"]
    for spn, proto, vip, port, node_port, eps in (
            ("default/web:http", "tcp", WEB_VIP, 80, 30080, ["a", "b"]),
            ("default/dns:dns", "udp", DNS_VIP, 53, 30053, ["u"])):
        base = port_chain_base(spn, proto)
        svc, ext = f"service-{base}", f"external-{base}"
        target = 8080 if proto == "tcp" else 5353
        chains = [f"endpoint-{endpoint_base(spn, proto, PODS[p], target)}" for p in eps]
        for chain in (svc, ext, *chains):
            out.append(f"add chain {t} {chain}")
        out.append(f"add element {t} cluster-ips {{ {vip} }}")
        out.append(f"add element {t} service-ips {{ {vip} . {proto} . {port} : goto {svc} }}")
        out.append(f"add element {t} service-nodeports {{ {proto} . {node_port} : goto {ext} }}")
        out.append(f"add rule {t} {svc} ip daddr {vip} {proto} dport {port} ip saddr != "
                   "10.244.0.0/16 jump mark-for-masquerade")
        vmap = ", ".join(f"{i} : goto {c}" for i, c in enumerate(chains))
        out.append(f"add rule {t} {svc} numgen random mod {len(chains)} vmap {{ {vmap} }}")
        out.append(f"add rule {t} {ext} jump mark-for-masquerade")
        out.append(f"add rule {t} {ext} goto {svc}")
        for p, chain in zip(eps, chains, strict=True):
            out.append(f"add rule {t} {chain} ip saddr {PODS[p]} jump mark-for-masquerade")
            out.append(f"add rule {t} {chain} meta l4proto {proto} dnat to {PODS[p]}:{target}")
    return "\n".join(out) + "\n"


def test_takeover_from_kube_proxy_nftables_mode(topo: Topology) -> None:
    for name, ip in PODS.items():
        topo.add_pod(name, ip)
    sh("nft", "-f", "-", netns=topo.node, stdin=kube_proxy_table())
    assert topo.answers("c1", "http", WEB_VIP, 80, 12).keys() == {"a", "b"}  # kube-proxy's
    theirs = parse_table(sh("nft", "list", "table", "ip", "kube-proxy",
                            netns=topo.node).stdout)
    their_endpoints = {c for c in theirs.chains if c.startswith("endpoint-")}
    assert len(their_endpoints) == 3
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)

    n = Node(topo, extra_config="nodePortAddresses: [all]", datapath="nftables")
    n.publish(service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB))
    n.publish(slice_("web", endpoints=[endpoint(PODS[p], "node-b") for p in ("a", "b", "c")]))
    n.publish(service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS))
    n.publish(slice_("dns", endpoints=[endpoint(PODS["u"], "node-b")], ports=DNS_EP))
    result = n.sync()
    details = result.apply.details["ipv4"]
    assert not details["rebuilt"]  # the same base chains and maps: repaired in place
    assert details["transactions"] == 1 and details["chains_flushed"] == 3
    flows.check()
    assert set(topo.answers("c1", "http", WEB_VIP, 80, 30)) == {"a", "b", "c"}
    assert set(topo.answers("c1", "http", NODE_IP, 30080, 30)) == {"a", "b", "c"}
    ours = parse_table(sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout)
    assert all(not ours.chains[c].rules for c in their_endpoints)
    state = n.plugin.families[4]
    state.clock = lambda: 1e12  # later: the flushed chains are deleted
    n.sync()
    left = parse_table(sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout)
    assert not their_endpoints & set(left.chains)
    restart = Node(topo, extra_config="nodePortAddresses: [all]", datapath="nftables")
    restart.publish(service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB))
    restart.publish(slice_("web", endpoints=[endpoint(PODS[p], "node-b")
                                             for p in ("a", "b", "c")]))
    restart.publish(service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS))
    restart.publish(slice_("dns", endpoints=[endpoint(PODS["u"], "node-b")], ports=DNS_EP))
    assert restart.sync().apply.changes == 0  # a restart of svcproxy changes nothing
