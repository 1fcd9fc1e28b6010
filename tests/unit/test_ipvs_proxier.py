"""kube-proxy's IPVS proxier tests (pkg/proxy/ipvs/proxier_test.go and
graceful_termination_test.go), ported: svcproxy's planner and IPVS reconciler
against fakes of the kernel doors (svcproxy.plugins.kernel.fakes), as
kube-proxy runs its proxier against ipvstest/netlinktest fakes. Each test
names the upstream test it comes from; where svcproxy deliberately differs
the docstring says so. The VM tier checks the same reconciler against the real
kernel with real traffic."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_

from svcproxy.ir import FrontendKey, ServiceMap
from svcproxy.plugins.ipvs.servers import IpvsOptions, IpvsState
from svcproxy.plugins.kernel.fakes import FakeIpvsKernel
from svcproxy.plugins.kernel.ipvs import F_PERSISTENT, F_SCHED1, F_SCHED2, RealServer, VirtualServer

NODE_IP = "192.168.1.10"
TCP80 = {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 8080}
EP_PORTS = [{"name": "p80", "port": 8080, "protocol": "TCP"}]


class Proxier:
    """A node with the IPVS reconciler on fake doors (NewFakeProxier)."""

    def __init__(self, **options: Any) -> None:
        self.kernel = FakeIpvsKernel()
        self.kernel.link.node_addresses = [NODE_IP]
        self.state = IpvsState(self.kernel, IpvsOptions(**options))
        self.now = 1000.0
        self.state.clock = lambda: self.now
        self.plan = ServiceMap()

    def sync(self, *objects: dict[str, Any], partial: bool = False) -> Any:
        plan = plan_of([node("node-a", ips=[NODE_IP]), *objects])
        changed = None
        if partial:
            keys = set(plan.frontends) | set(self.plan.frontends)
            changed = {k for k in keys if plan.frontends.get(k) != self.plan.frontends.get(k)}
        result = self.state.sync(plan, changed)
        if not result.failures:  # as the core: a failed sync's plan is not adopted
            self.plan = plan
        return result

    @property
    def ipvs(self) -> dict[tuple[str, int, str], dict[tuple[str, int], int]]:
        return self.kernel.nl.table()

    @property
    def bound(self) -> set[str]:
        return self.kernel.link.addresses()


def vs(address: str, port: int, proto: str = "TCP") -> tuple[str, int, str]:
    return (address, port, proto)


def test_cluster_ip() -> None:
    """TestClusterIP: a virtual server per ClusterIP port, real servers with
    weight 1, the ClusterIP bound to kube-ipvs0."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS),
           service("svc2", cluster_ip="1002:ab8::2:1", ipFamilies=["IPv6"], ports=[TCP80]),
           slice_("svc2", endpoints=[endpoint("1009:ab8::5:6", "node-b")], ports=EP_PORTS,
                  address_type="IPv6"))
    assert p.ipvs == {vs("10.20.30.41", 80): {("10.180.0.1", 8080): 1},
                      vs("1002:ab8::2:1", 80): {("1009:ab8::5:6", 8080): 1}}
    assert p.kernel.nl.services_[vs("10.20.30.41", 80)].scheduler == "rr"
    assert p.bound == {"10.20.30.41", "1002:ab8::2:1"}


def test_cluster_ip_no_endpoint() -> None:
    """TestClusterIPNoEndpoint: the virtual server exists, without real servers."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]))
    assert p.ipvs == {vs("10.20.30.41", 80): {}}
    assert p.bound == {"10.20.30.41"}


def test_node_port_ipv4() -> None:
    """TestNodePortIPv4: a virtual server on each node address at the NodePort
    (not bound to kube-ipvs0), besides the ClusterIP one."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   ports=[{**TCP80, "nodePort": 30001}]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a"),
                                     endpoint("10.180.1.1", "node-b")], ports=EP_PORTS))
    rss = {("10.180.0.1", 8080): 1, ("10.180.1.1", 8080): 1}
    assert p.ipvs == {vs("10.20.30.41", 80): rss, vs(NODE_IP, 30001): rss}
    assert p.bound == {"10.20.30.41"}


def test_node_port_no_endpoint() -> None:
    """TestNodePortNoEndpoint."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   ports=[{**TCP80, "nodePort": 30001}]))
    assert p.ipvs == {vs("10.20.30.41", 80): {}, vs(NODE_IP, 30001): {}}


def test_only_local_node_ports() -> None:
    """TestOnlyLocalNodePorts: externalTrafficPolicy Local sends NodePort
    traffic to this node's endpoints only; the ClusterIP keeps all."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   externalTrafficPolicy="Local", ports=[{**TCP80, "nodePort": 30001}]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a"),
                                     endpoint("10.180.1.1", "node-b")], ports=EP_PORTS))
    assert p.ipvs[vs(NODE_IP, 30001)] == {("10.180.0.1", 8080): 1}
    assert p.ipvs[vs("10.20.30.41", 80)] == {("10.180.0.1", 8080): 1, ("10.180.1.1", 8080): 1}


def test_local_policy_without_local_endpoints_uses_cluster_endpoints() -> None:
    """kube-proxy PR #97081 (TestOnlyLocalNodePorts' no-local case in IPVS
    mode): a Local-policy frontend with no local endpoint falls back to the
    cluster's endpoints instead of an empty virtual server."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   externalTrafficPolicy="Local", ports=[{**TCP80, "nodePort": 30001}]),
           slice_("svc1", endpoints=[endpoint("10.180.1.1", "node-b")], ports=EP_PORTS))
    assert p.ipvs[vs(NODE_IP, 30001)] == {("10.180.1.1", 8080): 1}


def test_load_balancer() -> None:
    """TestLoadBalancer: the ingress IP gets a virtual server and is bound."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="LoadBalancer",
                   ports=[{**TCP80, "nodePort": 30001}],
                   status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    assert set(p.ipvs) == {vs("10.20.30.41", 80), vs("1.2.3.4", 80), vs(NODE_IP, 30001)}
    assert p.bound == {"10.20.30.41", "1.2.3.4"}


def test_load_balancer_source_ranges() -> None:
    """TestLoadBalancerSourceRanges: the virtual server is there as for any
    LoadBalancer (the source filter is the helper sets' job, tested with them)."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="LoadBalancer",
                   ports=[{**TCP80, "nodePort": 30001}],
                   loadBalancerSourceRanges=["1.2.3.4/28"],
                   status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    assert p.ipvs[vs("1.2.3.4", 80)] == {("10.180.0.1", 8080): 1}


def test_external_ips() -> None:
    """TestExternalIPs: every external IP gets a virtual server and is bound."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80],
                   externalIPs=["50.60.70.81", "2012::51", "127.0.0.1"]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    assert vs("50.60.70.81", 80) in p.ipvs
    assert "50.60.70.81" in p.bound


def test_only_local_external_ips() -> None:
    """TestOnlyLocalExternalIPs."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80],
                   externalTrafficPolicy="Local", externalIPs=["50.60.70.81"]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a"),
                                     endpoint("10.180.1.1", "node-b")], ports=EP_PORTS))
    assert p.ipvs[vs("50.60.70.81", 80)] == {("10.180.0.1", 8080): 1}


def test_session_affinity() -> None:
    """TestSessionAffinity-style: ClientIP affinity is a persistent virtual
    server with the Service's timeout."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80], sessionAffinity="ClientIP",
                   sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}}),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    got = p.kernel.nl.services_[vs("10.20.30.41", 80)]
    assert got.flags & F_PERSISTENT and got.timeout == 300


@pytest.mark.parametrize(("annotations", "scheduler", "flags"), [
    ({}, "rr", 0),
    ({"svcproxy.io/ipvs-scheduler": "sh", "svcproxy.io/ipvs-scheduler-flags": "sh-port"},
     "sh", F_SCHED2),
    ({"svcproxy.io/ipvs-scheduler": "mh"}, "mh", F_SCHED1),  # mh-fallback always
])
def test_scheduler_and_flags(annotations: dict[str, str], scheduler: str, flags: int) -> None:
    """TestSchedulerEqual / the scheduler flags: what the virtual server carries."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80], annotations=annotations),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    got = p.kernel.nl.services_[vs("10.20.30.41", 80)]
    assert (got.scheduler, got.flags) == (scheduler, flags)


def test_terminating_endpoints_traffic_policy_local() -> None:
    """TestTerminatingEndpointsTrafficPolicyLocal: with no ready local endpoint,
    the serving terminating local ones are used."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   externalTrafficPolicy="Local", ports=[{**TCP80, "nodePort": 30001}]),
           slice_("svc1", endpoints=[
               endpoint("10.0.1.1", "node-a", ready=False, serving=True, terminating=True),
               endpoint("10.0.1.2", "node-a", ready=False, serving=False, terminating=True),
               endpoint("10.0.1.5", "node-b")], ports=EP_PORTS))
    assert p.ipvs[vs(NODE_IP, 30001)] == {("10.0.1.1", 8080): 1}


def test_terminating_endpoints_traffic_policy_cluster() -> None:
    """TestTerminatingEndpointsTrafficPolicyCluster: ready endpoints win over
    terminating ones; with none ready, the serving terminating ones."""
    p = Proxier()
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]),
           slice_("svc1", endpoints=[
               endpoint("10.0.1.1", "node-a", ready=False, serving=True, terminating=True),
               endpoint("10.0.1.5", "node-b")], ports=EP_PORTS))
    assert p.ipvs[vs("10.20.30.41", 80)] == {("10.0.1.5", 8080): 1}
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]),
           slice_("svc1", endpoints=[
               endpoint("10.0.1.1", "node-a", ready=False, serving=True, terminating=True),
               endpoint("10.0.1.2", "node-b", ready=False, serving=False, terminating=True)],
                  ports=EP_PORTS), partial=True)
    assert p.ipvs[vs("10.20.30.41", 80)] == {("10.0.1.1", 8080): 1}


def legacy(p: Proxier, entries: list[tuple[str, int]], bound: list[str]) -> None:
    """Virtual servers and addresses a previous run (or kube-proxy) left."""
    for address, port in entries:
        p.kernel.nl.add(VirtualServer(address, port, "UDP"))
    p.kernel.link.exists = True
    p.kernel.link.bound.update(bound)


def test_clean_legacy_service() -> None:
    """TestCleanLegacyService: virtual servers of Services that are gone are
    deleted, those inside excludeCIDRs stay; their addresses likewise. (Two
    differences, both stricter: a virtual server svcproxy does not own — not on
    kube-ipvs0, not NodePort-shaped — is kept even outside excludeCIDRs; and
    svcproxy is one dual-stack reconciler, so an unwanted IPv6 address goes too,
    as kube-proxy's IPv6 proxier would remove it.)"""
    p = Proxier(exclude_cidrs=("3.3.3.0/24", "4.4.4.0/24"))
    legacy(p, [("1.1.1.1", 53), ("2.2.2.2", 54), ("3.3.3.3", 55), ("4.4.4.4", 56),
               ("5.5.5.5", 57), ("6.6.6.6", 58), ("7.7.7.7", 59)],
           ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "5.5.5.5", "6.6.6.6"])
    dns = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
    p.sync(service("svc0", cluster_ip="1.1.1.1", ports=[dns]),
           service("svc1", cluster_ip="2.2.2.2", ports=[{**dns, "port": 54}]))
    assert set(p.ipvs) == {vs("1.1.1.1", 53, "UDP"), vs("2.2.2.2", 54, "UDP"),
                           vs("3.3.3.3", 55, "UDP"), vs("4.4.4.4", 56, "UDP"),
                           vs("7.7.7.7", 59, "UDP")}  # 7.7.7.7 is not svcproxy's
    assert p.bound == {"1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"}


def test_clean_legacy_service6() -> None:
    """TestCleanLegacyService6: the same for IPv6."""
    p = Proxier(exclude_cidrs=("3000::/64", "4000::/64"))
    legacy(p, [("1000::1", 53), ("1000::2", 54), ("3000::1", 55), ("4000::1", 56),
               ("5000::1", 57), ("1000::6", 58)],
           ["1000::1", "1000::2", "3000::1", "4000::1", "5000::1", "1000::6"])
    dns = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
    p.sync(service("svc0", cluster_ip="1000::1", ipFamilies=["IPv6"], ports=[dns]),
           service("svc1", cluster_ip="1000::2", ipFamilies=["IPv6"],
                   ports=[{**dns, "port": 54}]))
    assert set(p.ipvs) == {vs("1000::1", 53, "UDP"), vs("1000::2", 54, "UDP"),
                           vs("3000::1", 55, "UDP"), vs("4000::1", 56, "UDP")}
    assert p.bound == {"1000::1", "1000::2", "3000::1", "4000::1"}


def test_clean_legacy_service_with_real_servers() -> None:
    """TestCleanLegacyServiceWithRealServers: a stale virtual server goes with
    its real servers (no drain for a deleted Service)."""
    p = Proxier()
    legacy(p, [("1.1.1.1", 53), ("2.2.2.2", 54), ("3.3.3.3", 54)],
           ["1.1.1.1", "2.2.2.2", "3.3.3.3"])
    p.kernel.nl.dests_[vs("1.1.1.1", 53, "UDP")] = {("10.180.0.1", 53): RealServer(
        "10.180.0.1", 53)}
    p.sync(service("svc2", cluster_ip="3.3.3.3",
                   ports=[{"name": "dns", "port": 54, "protocol": "UDP", "targetPort": 54}]))
    assert set(p.ipvs) == {vs("3.3.3.3", 54, "UDP")}
    assert p.bound == {"3.3.3.3"}


def test_clean_legacy_real_servers_exclude_cidrs() -> None:
    """TestCleanLegacyRealServersExcludeCIDRs: a virtual server in excludeCIDRs
    keeps its real servers."""
    p = Proxier(exclude_cidrs=("4.4.4.4/32",))
    legacy(p, [("4.4.4.4", 56)], ["4.4.4.4"])
    key = vs("4.4.4.4", 56, "UDP")
    p.kernel.nl.dests_[key] = {("10.10.10.10", 56): RealServer("10.10.10.10", 56),
                              ("11.11.11.11", 56): RealServer("11.11.11.11", 56)}
    p.sync()
    assert len(p.ipvs[key]) == 2


def test_excluded_frontends_are_programmed() -> None:
    """excludeCIDRs as kube-proxy: they protect existing virtual servers from
    deletion, they do not stop a Service's frontend from being programmed."""
    p = Proxier(exclude_cidrs=("10.20.30.0/24",))
    objects = (service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]),
               slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a")], ports=EP_PORTS))
    p.sync(*objects)
    assert p.ipvs == {vs("10.20.30.41", 80): {("10.180.0.1", 8080): 1}}
    assert p.bound == {"10.20.30.41"}
    p.sync()  # the Service is deleted: its virtual server is inside the range
    assert vs("10.20.30.41", 80) in p.ipvs


def test_foreign_virtual_servers_survive_full_syncs() -> None:
    """Stricter than kube-proxy: keepalived's virtual server (not on kube-ipvs0,
    not NodePort-shaped) is never touched; a NodePort-shaped one on a node
    address is svcproxy's (a stale NodePort of a previous run) and goes."""
    p = Proxier()
    foreign = VirtualServer("192.0.2.50", 8080, "TCP", "wlc")
    p.kernel.nl.add(foreign, RealServer("192.0.2.51", 8080, 3))
    p.kernel.nl.add(VirtualServer(NODE_IP, 30999, "TCP"))
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]))
    p.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]))
    assert p.ipvs[foreign.key] == {("192.0.2.51", 8080): 3}
    assert p.kernel.nl.services_[foreign.key] == foreign
    assert vs(NODE_IP, 30999) not in p.ipvs
    assert not any(w[1] == foreign.key for w in p.kernel.nl.writes)


def test_multi_port_service_bind_addr() -> None:
    """TestMultiPortServiceBindAddr: the ClusterIP stays bound while any port
    uses it, through partial syncs, and goes with the last one."""
    p = Proxier()
    port2 = {**TCP80, "name": "p2", "port": 1235}
    udp = {**TCP80, "name": "p3", "port": 1236, "protocol": "UDP"}
    p.sync(service("svc1", cluster_ip="172.16.55.4", ports=[TCP80, port2]))
    assert p.bound == {"172.16.55.4"}
    p.sync(service("svc1", cluster_ip="172.16.55.4", ports=[TCP80]), partial=True)
    assert p.bound == {"172.16.55.4"}
    p.sync(service("svc1", cluster_ip="172.16.55.4", ports=[TCP80, port2, udp]), partial=True)
    assert p.bound == {"172.16.55.4"}
    assert not [c for c in p.kernel.link.changes if c[0] == "del"]  # never unbound on the way
    p.sync(partial=True)
    assert p.bound == set() and p.ipvs == {}


WEB = (service("web", cluster_ip="10.96.0.10", ports=[TCP80]),)


def web_eps(*ips: str) -> dict[str, Any]:
    return slice_("web", endpoints=[endpoint(ip, "node-a") for ip in ips], ports=EP_PORTS)


def test_graceful_delete_rs_waits_for_every_connection() -> None:
    """graceful_termination_test.go TestGracefulDeleteRS: a removed TCP real
    server with connections goes to weight 0 and stays until its active AND
    inactive connections are 0 (no time limit by default)."""
    p = Proxier()
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    key, gone = vs("10.96.0.10", 80), ("10.0.0.2", 8080)
    p.kernel.nl.connections[(key, gone)] = (1, 0)
    result = p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1, gone: 0}
    assert result.drained == 0 and len(p.state.draining) == 1
    p.now += 3600  # an hour later: still busy, still there
    p.kernel.nl.connections[(key, gone)] = (0, 2)  # only inactive (FIN_WAIT/TIME_WAIT) left
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert p.ipvs[key][gone] == 0
    p.kernel.nl.connections[(key, gone)] = (0, 0)
    result = p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1} and result.drained == 1
    assert not p.state.draining


def test_drain_timeout_and_drain_ignores_inactive() -> None:
    """The two bounds svcproxy offers, both off by default: `drainTimeout`
    deletes a busy draining real server after so many seconds;
    `drainIgnoresInactive` lets inactive connections not hold it."""
    p = Proxier(drain_timeout=60)
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    key, gone = vs("10.96.0.10", 80), ("10.0.0.2", 8080)
    p.kernel.nl.connections[(key, gone)] = (5, 5)
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    p.now += 59
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert gone in p.ipvs[key]
    p.now += 2
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert gone not in p.ipvs[key]
    q = Proxier(drain_ignores_inactive=True)
    q.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    q.kernel.nl.connections[(key, gone)] = (0, 3)
    q.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    q.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert gone not in q.ipvs[key]


def test_an_endpoint_back_while_draining_gets_its_weight_back() -> None:
    """kube-proxy deletes and re-adds it (dropping its connections); svcproxy
    restores the weight in place."""
    p = Proxier()
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    key, back = vs("10.96.0.10", 80), ("10.0.0.2", 8080)
    p.kernel.nl.connections[(key, back)] = (1, 0)
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"), partial=True)
    assert p.ipvs[key][back] == 1 and not p.state.draining
    assert ("delete real server", key, back) not in p.kernel.nl.writes


@pytest.mark.parametrize("proto", ["UDP", "SCTP"])
def test_udp_and_sctp_real_servers_are_deleted_at_once(proto: str) -> None:
    """IsRsGracefulTerminationNeeded is false for UDP and SCTP; UDP's conntrack
    entries through the removed real server are flushed."""
    p = Proxier()
    port = {**TCP80, "protocol": proto}
    eps = [{**EP_PORTS[0], "protocol": proto}]
    svc = service("web", cluster_ip="10.96.0.10", ports=[port])
    p.sync(svc, slice_("web", endpoints=[endpoint("10.0.0.1"), endpoint("10.0.0.2")],
                       ports=eps))
    key = vs("10.96.0.10", 80, proto)
    p.kernel.nl.connections[(key, ("10.0.0.2", 8080))] = (3, 3)
    p.sync(svc, slice_("web", endpoints=[endpoint("10.0.0.1")], ports=eps), partial=True)
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1}
    flushed = [args for args, _ in p.kernel.conntrack.deleted]
    assert bool(flushed) == (proto == "UDP")
    if flushed:
        assert "10.0.0.2" in flushed[0] and "10.96.0.10" in flushed[0]


def test_full_and_partial_syncs_write_only_the_difference() -> None:
    """One code path: a partial sync of one endpoint change writes one real
    server; a full sync with nothing changed writes nothing."""
    p = Proxier()
    services = [service(f"s{i}", cluster_ip=f"10.96.1.{i}", ports=[TCP80]) for i in range(5)]
    slices = [slice_(f"s{i}", endpoints=[endpoint(f"10.0.1.{i}")], ports=EP_PORTS)
              for i in range(5)]
    p.sync(*services, *slices)
    writes = len(p.kernel.nl.writes)
    assert writes == 10
    slices[2] = slice_("s2", endpoints=[endpoint("10.0.1.2"), endpoint("10.0.2.2")],
                       ports=EP_PORTS)
    p.sync(*services, *slices, partial=True)
    assert p.kernel.nl.writes[writes:] == [("add real server", vs("10.96.1.2", 80),
                                            ("10.0.2.2", 8080))]
    p.sync(*services, *slices)  # full
    assert len(p.kernel.nl.writes) == writes + 1


def test_a_refused_batch_is_read_back_and_repaired() -> None:
    """The kernel refuses one operation: the sync reports it, the store forgets
    what the batch touched, and the next sync (partial) reads those virtual
    servers back and converges."""
    p = Proxier()
    p.sync(*WEB, web_eps("10.0.0.1"))
    key = vs("10.96.0.10", 80)
    p.kernel.nl.refuse = lambda op, v, rs: errno.ENOMEM if rs and rs.address == "10.0.0.3" \
        else None
    result = p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2", "10.0.0.3"), partial=True)
    assert result.failures and "10.0.0.3" in result.failures[0]
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1, ("10.0.0.2", 8080): 1}  # the rest applied
    assert not p.state.vs.known
    p.kernel.nl.refuse = None
    reads = p.kernel.nl.reads
    result = p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2", "10.0.0.3"), partial=True)
    assert not result.failures and p.kernel.nl.reads > reads
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1, ("10.0.0.2", 8080): 1,
                           ("10.0.0.3", 8080): 1}
    assert p.state.vs.known


def test_drift_is_repaired_by_a_full_sync_only() -> None:
    """A partial sync trusts the store; a full sync reads the kernel and puts
    back what someone changed (weights, a deleted real server, a scheduler)."""
    p = Proxier()
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    key = vs("10.96.0.10", 80)
    p.kernel.nl.dests_[key].pop(("10.0.0.2", 8080))
    p.kernel.nl.services_[key] = VirtualServer("10.96.0.10", 80, "TCP", "wlc")
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"), partial=True)
    assert ("10.0.0.2", 8080) not in p.ipvs[key]
    p.sync(*WEB, web_eps("10.0.0.1", "10.0.0.2"))
    assert p.ipvs[key] == {("10.0.0.1", 8080): 1, ("10.0.0.2", 8080): 1}
    assert p.kernel.nl.services_[key].scheduler == "rr"


def test_a_refused_address_is_reported_and_read_back() -> None:
    p = Proxier()
    p.kernel.link.refuse = {"10.96.0.10"}
    result = p.sync(*WEB, web_eps("10.0.0.1"))
    assert any("10.96.0.10" in f for f in result.failures)
    assert p.state.addresses.unread
    p.kernel.link.refuse = set()
    p.sync(*WEB, web_eps("10.0.0.1"), partial=True)
    assert p.bound == {"10.96.0.10"}


def test_plan_key() -> None:
    """The reconciler's keys are the plan's frontend keys."""
    p = Proxier()
    p.sync(*WEB, web_eps("10.0.0.1"))
    assert FrontendKey("10.96.0.10", 80, "TCP") in p.plan.frontends
