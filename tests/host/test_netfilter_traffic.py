"""The netfilter datapaths (iptables and nftables) with real traffic: clients
in their own namespaces reach "pods" through the node namespace's rules. Every
test runs against both: they implement the same kube-proxy semantics."""

from __future__ import annotations

import pytest
from conftest import NODE_IP, Node
from factories import endpoint, node, service, slice_
from netns import Topology, sh

from svcproxy.bus import EventType

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]


@pytest.fixture(params=["iptables", "nftables"])
def datapath(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pods(topo: Topology, *spec: tuple[str, str, str]) -> list[dict]:  # type: ignore[type-arg]
    """Start pods and return their endpoints: (name, ip, node)."""
    eps = []
    for name, ip, node_name in spec:
        topo.add_pod(name, ip)
        eps.append(endpoint(ip, node_name))
    return eps


def test_cluster_ip_and_node_port_spread_over_all_backends(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    eps = pods(topo, ("a", "10.244.1.11", "node-a"), ("b", "10.244.2.12", "node-b"),
               ("c", "10.244.3.13", "node-c"))
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30080}]))
    n.publish(slice_("web", endpoints=eps))
    n.sync()
    for host, port in (("10.96.0.10", 80), (NODE_IP, 30080)):
        answers = topo.answers("c1", "http", host, port, 60)
        assert set(answers) == {"a", "b", "c"}, (host, answers)
        assert min(answers.values()) >= 8, (host, answers)


def test_session_affinity_sticks(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    eps = pods(topo, ("a", "10.244.1.11", "node-a"), ("b", "10.244.2.12", "node-b"))
    n.publish(service("sticky", cluster_ip="10.96.0.20", ports=HTTP, sessionAffinity="ClientIP",
                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}))
    n.publish(slice_("sticky", endpoints=eps))
    n.sync()
    answers = topo.answers("c1", "http", "10.96.0.20", 80, 20)
    assert len(answers) == 1 and sum(answers.values()) == 20, answers


def test_service_without_endpoints_is_refused_at_once(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    n.publish(service("empty", cluster_ip="10.96.0.30", ports=HTTP))
    n.sync()
    out = topo.client("c1", "http", "10.96.0.30", "80", "3")
    assert out["answers"] == {"!refused": 3}
    assert out["seconds"] < 1.0  # type: ignore[operator]


def test_local_policy_reaches_only_local_backends(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    eps = pods(topo, ("local1", "10.244.1.11", "node-a"), ("local2", "10.244.1.12", "node-a"),
               ("remote", "10.244.2.13", "node-b"))
    n.publish(service("edge", cluster_ip="10.96.0.40", type="NodePort",
                      externalTrafficPolicy="Local",
                      ports=[{**HTTP[0], "nodePort": 30090}]))
    n.publish(slice_("edge", endpoints=eps))
    n.sync()
    external = topo.answers("c1", "http", NODE_IP, 30090, 40)
    assert set(external) == {"local1", "local2"}, external
    internal = topo.answers("c1", "http", "10.96.0.40", 80, 45)
    assert set(internal) == {"local1", "local2", "remote"}, internal


def test_local_policy_without_local_endpoints_drops(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    eps = pods(topo, ("remote", "10.244.2.13", "node-b"))
    n.publish(service("edge", cluster_ip="10.96.0.41", type="NodePort",
                      externalTrafficPolicy="Local", ports=[{**HTTP[0], "nodePort": 30091}]))
    n.publish(slice_("edge", endpoints=eps))
    n.sync()
    assert topo.answers("c1", "http", NODE_IP, 30091, 2) == {"!timeout": 2}
    assert topo.answers("c1", "http", "10.96.0.41", 80, 3) == {"remote": 3}


def test_load_balancer_source_ranges(topo: Topology, datapath: str) -> None:
    # every node address serves NodePorts (nftables mode's default is the primary one)
    n = Node(topo, extra_config="nodePortAddresses: [all]", datapath=datapath)
    eps = pods(topo, ("a", "10.244.1.11", "node-a"))
    n.publish(service("lb", cluster_ip="10.96.0.50", type="LoadBalancer",
                      ports=[{**HTTP[0], "nodePort": 30100}],
                      loadBalancerSourceRanges=["192.168.100.0/24"],
                      status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}))
    n.publish(slice_("lb", endpoints=eps))
    n.sync()
    assert topo.answers("c1", "http", "203.0.113.10", 80, 3) == {"a": 3}
    assert topo.answers("c2", "http", "203.0.113.10", 80, 2) == {"!timeout": 2}
    # source ranges guard the LoadBalancer IP only, as in kube-proxy
    assert topo.answers("c2", "http", NODE_IP.replace("192.168.100", "198.51.100"), 30100,
                        2) == {"a": 2}


def test_udp_clients_move_off_a_removed_endpoint(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    eps = pods(topo, ("a", "10.244.1.11", "node-a"), ("b", "10.244.2.12", "node-b"))
    dns = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
    n.publish(service("dns", cluster_ip="10.96.0.53", ports=dns))
    n.publish(slice_("dns", endpoints=eps, ports=SLICE_PORTS))
    n.sync()
    hold = topo.hold_udp("c1", "10.96.0.53", 53)
    first = hold.ask()
    assert first in ("a", "b")
    assert hold.ask() == first  # one socket, one conntrack entry, one backend
    keep = [e for e in eps if e["addresses"][0] != topo.pods[first].ip]
    n.publish(slice_("dns", endpoints=keep, ports=SLICE_PORTS), EventType.MODIFIED)
    result = n.sync()
    assert result.apply.details["conntrack_deleted"] >= 1
    other = "b" if first == "a" else "a"
    assert hold.ask() == other  # the pod still runs: only conntrack cleanup moves us
    hold.close()


def test_ipv6_cluster_ip(topo: Topology, datapath: str) -> None:
    n = Node(topo, datapath=datapath)
    topo.add_pod("a6", "10.244.1.11", ip6="fd00:244:1::11")
    n.publish(service("v6", cluster_ip=["10.96.0.60", "fd00:96::60"], ports=HTTP))
    n.publish(slice_("v6", name="v6-4", endpoints=[endpoint("10.244.1.11", "node-a")]))
    n.publish(slice_("v6", name="v6-6", address_type="IPv6",
                     endpoints=[endpoint("fd00:244:1::11", "node-a")]))
    n.sync()
    assert topo.answers("c1", "http", "fd00:96::60", 80, 3) == {"a6": 3}
    assert topo.answers("c1", "http", "10.96.0.60", 80, 3) == {"a6": 3}
    if datapath == "iptables":
        rules = sh("ip6tables-nft-save", "-t", "nat", netns=topo.node).stdout
        assert "-d fd00:96::60/128 -p tcp" in rules
    else:
        table = sh("nft", "list", "table", "ip6", "kube-proxy", netns=topo.node).stdout
        assert "fd00:96::60 . tcp . 80 : goto service-" in table


def node_link(topo: Topology, ip: str) -> str:
    """The node's interface towards a pod."""
    out = sh("ip", "-o", "route", "get", ip, netns=topo.node).stdout.split()
    return out[out.index("dev") + 1]


def test_localhost_node_ports(topo: Topology, datapath: str) -> None:
    """iptables.localhostNodePorts (default true): a NodePort answers on
    127.0.0.1 from the node itself (route_localnet=1, kube-proxy's martian
    filter in KUBE-FIREWALL); with it off, loopback is not a NodePort address.
    nftables never answers there (as kube-proxy's nftables mode)."""
    eps = pods(topo, ("a", "10.244.1.11", "node-a"))
    np = service("web", cluster_ip="10.96.0.10", type="NodePort",
                 ports=[{**HTTP[0], "nodePort": 30080}])
    n = Node(topo, datapath=datapath)
    n.publish(np)
    n.publish(slice_("web", endpoints=eps))
    n.sync()
    topo.clients["node"] = topo.node
    if datapath == "nftables":
        # kube-proxy's nftables mode never serves NodePorts on loopback
        assert topo.answers("node", "http", "127.0.0.1", 30080, 2) == {"!refused": 2}
        assert topo.answers("c1", "http", NODE_IP, 30080, 2) == {"a": 2}
        return
    assert topo.answers("node", "http", "127.0.0.1", 30080, 4) == {"a": 4}
    assert sh("sysctl", "-n", "net.ipv4.conf.all.route_localnet",
              netns=topo.node).stdout.strip() == "1"
    rules = sh("iptables-nft-save", "-t", "filter", netns=topo.node).stdout
    assert '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment ' \
           '"block incoming localnet connections"' in rules
    assert "-A INPUT -j KUBE-FIREWALL" in rules and "-A OUTPUT -j KUBE-FIREWALL" in rules
    off = Node(topo, extra_config="iptables: {localhostNodePorts: false}")
    off.publish(np)
    off.publish(slice_("web", endpoints=eps))
    off.sync()
    assert topo.answers("node", "http", "127.0.0.1", 30080, 2) == {"!refused": 2}
    assert topo.answers("c1", "http", NODE_IP, 30080, 2) == {"a": 2}  # others unchanged


@pytest.mark.parametrize(("extra", "masqueraded"), [
    ("", False),  # detectLocalMode ClusterCIDR (the default): a pod's source is kept
    ("MODE: {masqueradeAll: true}", True),
    ("detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: POD-PREFIX}",
     False),
    ("detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: nomatch}", True),
    ("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: POD-LINK}", False),
    ("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: nomatch0}", True),
    # the Node's podCIDR: 10.244.1.0/24 holds pod a; 10.244.9.0/24 does not
    ("detectLocalMode: NodeCIDR #10.244.1.0/24", False),
    ("detectLocalMode: NodeCIDR #10.244.9.0/24", True),
])
def test_who_is_masqueraded_on_the_way_to_a_cluster_ip(topo: Topology, datapath: str, extra: str,
                                                       masqueraded: bool) -> None:
    """masqueradeAll and every detect-local mode with traffic: pod a calls a
    ClusterIP whose one endpoint is pod b; b sees a's address when a counts as
    local, the node's (169.254.1.1 on b's link) when the traffic was
    masqueraded."""
    a = topo.add_pod("a", "10.244.1.11")
    pods(topo, ("b", "10.244.2.12", "node-b"))
    link = node_link(topo, a.ip)
    extra = extra.replace("POD-PREFIX", link[:-1]).replace("POD-LINK", link)
    n = Node(topo, extra_config=extra, datapath=datapath)
    if "NodeCIDR" in extra:
        with_cidr = node("node-a", ips=[NODE_IP])
        with_cidr["spec"] = {"podCIDRs": [extra.split("#")[1]]}
        n.publish(with_cidr, EventType.MODIFIED)
    n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    n.publish(slice_("web", endpoints=[endpoint("10.244.2.12", "node-b")]))
    n.sync()
    topo.clients["a"] = a.netns
    seen = topo.client("a", "whoami", "10.96.0.10", "80", "3")["answers"]
    assert seen == {"169.254.1.1" if masqueraded else a.ip: 3}, (extra, seen)


def test_a_pod_that_reaches_itself_through_its_service_is_masqueraded(
        topo: Topology, datapath: str) -> None:
    """Hairpin: pod a calls a ClusterIP whose endpoint is a itself. Without
    masquerading, a would answer itself directly and the connection would
    never complete; masqueraded, it sees the node's address."""
    a = topo.add_pod("a", "10.244.1.11")
    n = Node(topo, datapath=datapath)
    n.publish(service("self", cluster_ip="10.96.0.70", ports=HTTP))
    n.publish(slice_("self", endpoints=[endpoint("10.244.1.11", "node-a")]))
    n.sync()
    topo.clients["a"] = a.netns
    assert topo.client("a", "whoami", "10.96.0.70", "80", "3")["answers"] == {"169.254.1.1": 3}
