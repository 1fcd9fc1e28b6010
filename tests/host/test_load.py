"""Load tests of the iptables datapath (host; the IPVS ones run in the VM): a
rolling update of every pod of a multi-port, dual-stack Service under steady
load, and a UDP client while its server pod cycles. Each ends in counted
failed requests, which must be 0, and a latency bound (p99 < 1 s: a 1 s
outlier is a dropped SYN). After every step the kernel is read back and
compared with the plan: a fresh first sync would change nothing (traffic
alone can hide wrong state)."""

from __future__ import annotations

import time

from conftest import NODE_IP, Node
from factories import endpoint, service, slice_
from netns import Loader, Topology, syn_retransmits

from svcproxy.bus import EventType

VIP4, VIP6, DNS_VIP = "10.96.0.10", "fd00:96::10", "10.96.0.53"
PORTS = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
         {"name": "alt", "port": 81, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}]
EP_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "alt", "port": 8080, "protocol": "TCP"}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
STEP = 0.7  # seconds of load in each state


def settled(n: Node) -> None:
    """Sync what changed, then read the kernel back: nothing left to change."""
    n.sync()
    assert n.preview() == [], "the kernel differs from the plan"


def test_rolling_update_of_a_dual_stack_multi_port_service_under_load(topo: Topology) -> None:
    n = Node(topo)  # rebound below when svcproxy restarts
    pods: dict[str, tuple[str, str]] = {}

    def pod(name: str, i: int) -> None:
        pods[name] = (f"10.244.{i}.11", f"fd00:244:{i}::11")
        topo.add_pod(name, *pods[name])

    def publish(states: dict[str, dict[str, bool]]) -> None:
        """EndpointSlices (one per family) with the given conditions per pod."""
        for family, index in (("IPv4", 0), ("IPv6", 1)):
            eps = [endpoint(pods[p][index], f"node-{p}", **cond) for p, cond in states.items()]
            n.publish(slice_("web", name=f"web-{family.lower()}", ports=EP_PORTS,
                             endpoints=eps, address_type=family), EventType.MODIFIED)

    ready = {"ready": True, "serving": True, "terminating": False}
    for i, name in enumerate(("old-1", "old-2", "old-3"), 1):
        pod(name, i)
    n.publish(service("web", cluster_ip=[VIP4, VIP6], type="NodePort", ports=PORTS,
                      ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"))
    states = {p: dict(ready) for p in ("old-1", "old-2", "old-3")}
    publish(states)
    settled(n)
    syns = syn_retransmits(topo.clients["c1"])
    loads = {
        # keep-alive clients, and new connections from 10 source ports reused
        "v4:80": Loader(topo, ["load", VIP4, "80", "3", "20", "40000-40009"]),
        "v4:81": Loader(topo, ["load", VIP4, "81", "1", "5", "40100-40104"]),
        "v6:80": Loader(topo, ["load", VIP6, "80", "2", "10", "40200-40209"]),
        "nodeport": Loader(topo, ["load", NODE_IP, "30080", "1", "10", "40300-40309"]),
    }
    for i, old in enumerate(("old-1", "old-2", "old-3"), 1):
        new = f"new-{i}"
        pod(new, 10 + i)
        states[new] = {"ready": False, "serving": False, "terminating": False}  # starting
        publish(states)
        settled(n)
        time.sleep(STEP)
        states[new] = dict(ready)
        publish(states)
        settled(n)
        time.sleep(STEP)
        # the old pod gets SIGTERM: still serving through its grace period,
        # closing keep-alive connections politely
        topo.pods[old].process.terminate()
        states[old] = {"ready": False, "serving": True, "terminating": True}
        publish(states)
        settled(n)
        time.sleep(STEP)
        del states[old]
        publish(states)
        settled(n)
        time.sleep(STEP)  # connections established before the removal finish
        topo.pods[old].process.close()
        if i == 1:
            # svcproxy restarts under load (a new process knows nothing): its
            # first sync reads the kernel and changes nothing
            n = Node(topo)
            n.publish(service("web", cluster_ip=[VIP4, VIP6], type="NodePort", ports=PORTS,
                              ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"))
            publish(states)
            assert n.preview() == []
            assert n.sync(full=True).apply.changes == 0
            time.sleep(STEP)
    time.sleep(STEP)
    results = {name: loader.finish() for name, loader in loads.items()}
    assert syn_retransmits(topo.clients["c1"]) == syns  # no SYN went unanswered
    for name, r in results.items():
        assert r["failed"] == 0, (name, r)
        assert r["ok"] > 50, (name, r)
        assert r["p99"] < 1.0, (name, r)
        # every new pod answered (the old ones did before they went)
        assert {"new-1", "new-2", "new-3"} <= set(r["answers"]), (name, r)
    assert set(states) == {"new-1", "new-2", "new-3"}


def test_udp_flow_survives_its_server_pod_cycling(topo: Topology) -> None:
    """kube-proxy's e2e "should be able to preserve UDP traffic when server pod
    cycles": one client socket keeps sending while its only server pod is
    replaced; its conntrack entry is moved to the new pod, nothing is lost."""
    n = Node(topo)
    topo.add_pod("u1", "10.244.1.53")
    n.publish(service("dns", cluster_ip=DNS_VIP, ports=DNS))
    n.publish(slice_("dns", ports=DNS_EP, endpoints=[endpoint("10.244.1.53", "node-a")]))
    settled(n)
    udp = Loader(topo, ["udp-load", DNS_VIP, "53"])
    time.sleep(STEP)
    topo.add_pod("u2", "10.244.2.53")
    n.publish(slice_("dns", ports=DNS_EP, endpoints=[
        endpoint("10.244.1.53", "node-a", ready=False, serving=True, terminating=True),
        endpoint("10.244.2.53", "node-b")]), EventType.MODIFIED)
    settled(n)
    time.sleep(STEP)
    n.publish(slice_("dns", ports=DNS_EP, endpoints=[endpoint("10.244.2.53", "node-b")]),
              EventType.MODIFIED)
    settled(n)  # deletes u1's UDP conntrack entries: the flow moves to u2
    topo.pods["u1"].process.close()
    time.sleep(STEP)
    r = udp.finish()
    assert r["failed"] == 0, r
    assert r["answers"].get("u2", 0) > 10, r  # the same socket now reaches u2
    assert r["p99"] < 1.0, r

