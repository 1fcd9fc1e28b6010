"""The planner with the built-in feature plugins: every service type, traffic
policies, dual-stack, and partial re-planning."""

from __future__ import annotations

import textwrap

from factories import build_state, endpoint, node, plan_of, service, slice_
from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.config import Config, parse_config
from svcproxy.ir import FrontendKey, FrontendKind, ServiceMap
from svcproxy.manager import PluginHost
from svcproxy.model import parse_node
from svcproxy.plan import Planner, make_context, node_port_addresses

NODE = node("node-a", ips=["192.168.1.10", "10.0.0.10", "fd00::10"], zone="z1")


def eps(*items, **kw):  # type: ignore[no-untyped-def]
    return slice_(endpoints=list(items), **kw)


def keys(plan: ServiceMap) -> list[str]:
    return [str(f.key) for f in plan]


def test_cluster_ip() -> None:
    plan = plan_of([NODE, service(), eps(endpoint("10.244.1.1", "node-a"),
                                         endpoint("10.244.2.1", "node-b"))])
    (fe,) = list(plan)
    assert fe.key == FrontendKey("10.96.0.10", 80, "TCP")
    assert fe.kind == FrontendKind.CLUSTER_IP and fe.service == "default/web:http"
    assert fe.scheduler == "rr" and fe.persistence_timeout == 0 and fe.bind_address
    assert [(b.address, b.port, b.weight, b.local) for b in fe.backends] == \
        [("10.244.1.1", 8080, 1, True), ("10.244.2.1", 8080, 1, False)]


def test_configured_scheduler() -> None:
    cfg = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" \
          "ipvs: {scheduler: wlc}\n"
    (fe,) = list(plan_of([service(), eps(endpoint("10.244.1.1"))], cfg))
    assert fe.scheduler == "wlc"


def test_no_endpoints_keeps_the_frontend() -> None:
    (fe,) = list(plan_of([service()]))
    assert fe.backends == ()


def test_node_port_on_every_node_address_of_the_family() -> None:
    svc = service(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080,
                                          "targetPort": 8080}])
    plan = plan_of([NODE, svc, eps(endpoint("10.244.1.1", "node-b"))])
    assert keys(plan) == ["10.0.0.10:30080/TCP", "10.96.0.10:80/TCP", "192.168.1.10:30080/TCP"]
    np = plan.get(FrontendKey("10.0.0.10", 30080, "TCP"))
    assert np is not None and np.kind == FrontendKind.NODE_PORT and not np.bind_address


def test_node_port_addresses_setting() -> None:
    n = parse_node(NODE)
    addrs = ("192.168.1.10", "10.0.0.10", "127.0.0.1")
    assert node_port_addresses(addrs, n, (), 4) == ("192.168.1.10", "10.0.0.10")
    assert node_port_addresses(addrs, n, ("10.0.0.0/8",), 4) == ("10.0.0.10",)
    assert node_port_addresses(addrs, n, ("primary",), 4) == ("192.168.1.10",)
    assert node_port_addresses(addrs, n, ("127.0.0.0/8",), 4) == ()
    assert node_port_addresses(("fd00::10",), n, ("primary",), 6) == ("fd00::10",)


def test_node_port_without_node_object_has_no_address() -> None:
    svc = service(type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    assert keys(plan_of([svc])) == ["10.96.0.10:80/TCP"]


def test_external_ips_bound_unless_local() -> None:
    svc = service(externalIPs=["203.0.113.5", "192.168.1.10", "fd00::99"])
    plan = plan_of([NODE, svc, eps(endpoint("10.244.1.1"))])
    ext = {f.address: f for f in plan if f.kind == FrontendKind.EXTERNAL_IP}
    assert sorted(ext) == ["192.168.1.10", "203.0.113.5"]  # IPv6 address of a v4 service: no
    assert ext["203.0.113.5"].bind_address and not ext["192.168.1.10"].bind_address


def test_load_balancer() -> None:
    svc = service(type="LoadBalancer",
                  ports=[{"name": "https", "port": 443, "nodePort": 31443}],
                  loadBalancerSourceRanges=["198.51.100.0/24", "2001:db8::/32"],
                  status={"loadBalancer": {"ingress": [
                      {"ip": "203.0.113.10"}, {"ip": "203.0.113.11", "ipMode": "Proxy"},
                      {"hostname": "lb.example.com"}]}})
    plan = plan_of([NODE, svc, eps(endpoint("10.244.1.1"), ports=[{"name": "https",
                                                                   "port": 8443}])])
    lbs = [f for f in plan if f.kind == FrontendKind.LOAD_BALANCER]
    assert [f.address for f in lbs] == ["203.0.113.10"]
    assert lbs[0].source_ranges == ("198.51.100.0/24",)
    assert lbs[0].bind_address
    assert len([f for f in plan if f.kind == FrontendKind.NODE_PORT]) == 2


def test_session_affinity() -> None:
    svc = service(type="NodePort", ports=[{"port": 80, "nodePort": 30001}],
                  sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    plan = plan_of([NODE, svc])
    assert {f.persistence_timeout for f in plan} == {600}
    svc2 = service(sessionAffinity="ClientIP")
    assert {f.persistence_timeout for f in plan_of([svc2])} == {10800}


LOCAL_EPS = [endpoint("10.244.1.1", "node-a"), endpoint("10.244.2.1", "node-b")]


def lb_local(**kw):  # type: ignore[no-untyped-def]
    return service(type="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                   status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}, **kw)


def test_external_traffic_policy_local() -> None:
    plan = plan_of([NODE, lb_local(externalTrafficPolicy="Local", healthCheckNodePort=32000),
                    eps(*LOCAL_EPS)])
    by_kind = {f.kind: f for f in plan}
    ci = by_kind[FrontendKind.CLUSTER_IP]
    assert [b.address for b in ci.backends] == ["10.244.1.1", "10.244.2.1"]
    assert ci.traffic_policy == "Cluster"
    for kind in (FrontendKind.NODE_PORT, FrontendKind.LOAD_BALANCER):
        f = by_kind[kind]
        assert f.traffic_policy == "Local"
        assert [b.address for b in f.backends] == ["10.244.1.1"]
        assert [b.address for b in f.cluster_backends] == ["10.244.1.1", "10.244.2.1"]
    summary = plan.services["default/web"]
    assert summary.health_check_node_port == 32000 and summary.local_ready_endpoints == 1
    assert not summary.no_local_endpoints_external


def test_external_local_without_local_endpoints() -> None:
    plan = plan_of([NODE, lb_local(externalTrafficPolicy="Local"),
                    eps(endpoint("10.244.2.1", "node-b"))])
    lb = next(f for f in plan if f.kind == FrontendKind.LOAD_BALANCER)
    assert lb.backends == () and [b.address for b in lb.cluster_backends] == ["10.244.2.1"]
    assert plan.services["default/web"].no_local_endpoints_external


def test_internal_traffic_policy_local_cluster_ip_only() -> None:
    plan = plan_of([NODE, service(internalTrafficPolicy="Local"), eps(*LOCAL_EPS)])
    (fe,) = list(plan)
    assert [b.address for b in fe.backends] == ["10.244.1.1"]
    assert fe.cluster_backends == ()  # ClusterIP-only: no cluster endpoints at all
    plan = plan_of([NODE, service(internalTrafficPolicy="Local"),
                    eps(endpoint("10.244.2.1", "node-b"))])
    (fe,) = list(plan)
    assert fe.backends == () and fe.cluster_backends == ()
    assert plan.services["default/web"].no_local_endpoints_internal


def test_internal_local_on_externally_accessible_service_keeps_cluster_fallback() -> None:
    plan = plan_of([NODE, lb_local(internalTrafficPolicy="Local"),
                    eps(endpoint("10.244.2.1", "node-b"))])
    ci = next(f for f in plan if f.kind == FrontendKind.CLUSTER_IP)
    assert ci.backends == () and [b.address for b in ci.cluster_backends] == ["10.244.2.1"]
    np = next(f for f in plan if f.kind == FrontendKind.NODE_PORT)
    assert [b.address for b in np.backends] == ["10.244.2.1"]


def test_terminating_endpoints() -> None:
    plan = plan_of([NODE, service(), eps(
        endpoint("10.244.1.1", "node-a", ready=False, serving=True, terminating=True),
        endpoint("10.244.2.1", "node-b", ready=True))])
    assert [b.address for b in next(iter(plan)).backends] == ["10.244.2.1"]
    plan = plan_of([NODE, service(), eps(
        endpoint("10.244.1.1", "node-a", ready=False, serving=True, terminating=True))])
    (b,) = next(iter(plan)).backends
    assert b.terminating and not b.ready


def test_ignored_services_plan_nothing() -> None:
    plan = plan_of([
        service("headless", cluster_ip="None"),
        {**service("ext", type="ExternalName", cluster_ip="", externalName="x.example.com")},
        service("other", labels={"service.kubernetes.io/service-proxy-name": "foo"}),
        eps(endpoint("10.244.1.1"), name="headless-1", service_name="headless"),
    ])
    assert len(plan) == 0


def test_dual_stack_plans_per_family() -> None:
    svc = service(cluster_ip=["10.96.0.10", "fd00:96::10"], type="NodePort",
                  ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    plan = plan_of([NODE, svc, eps(endpoint("10.244.1.1", "node-a")),
                    eps(endpoint("fd00:244::1", "node-a"), name="web-v6", address_type="IPv6")])
    v6 = plan.for_family(6)
    assert keys(v6) == ["[fd00::10]:30080/TCP", "[fd00:96::10]:80/TCP"]
    assert all(b.address == "fd00:244::1" for f in v6 for b in f.backends)
    assert all(b.address == "10.244.1.1" for f in plan.for_family(4) for b in f.backends)


def test_multi_port_udp_and_named_target_ports() -> None:
    svc = service("dns", cluster_ip="10.96.0.53", ports=[
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"}])
    s = slice_("dns", endpoints=[endpoint("10.244.1.2")],
               ports=[{"name": "dns", "port": 5353, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}])
    plan = plan_of([svc, s])
    assert {(str(f.key), f.backends[0].port) for f in plan} == \
        {("10.96.0.53:53/UDP", 5353), ("10.96.0.53:53/TCP", 5354)}


def test_conflicting_frontend_first_service_wins(caplog) -> None:  # type: ignore[no-untyped-def]
    a = service("a", externalIPs=["203.0.113.1"])
    b = service("b", cluster_ip="10.96.0.11", externalIPs=["203.0.113.1"])
    plan = plan_of([a, b])
    assert plan.get(FrontendKey("203.0.113.1", 80, "TCP")).service == "default/a:http"  # type: ignore[union-attr]
    assert "already used by default/a:http" in caplog.text


def test_diff() -> None:
    old = plan_of([service("a"), service("b", cluster_ip="10.96.0.11")])
    new = plan_of([service("a"), service("c", cluster_ip="10.96.0.12"),
                   eps(endpoint("10.244.1.1"), service_name="a")])
    d = new.diff(old)
    assert [str(k) for k in d.created] == ["10.96.0.12:80/TCP"]
    assert [str(k) for k in d.updated] == ["10.96.0.10:80/TCP"]
    assert [str(k) for k in d.deleted] == ["10.96.0.11:80/TCP"]
    assert not new.diff(new)


# -- partial re-planning gives the same result as a full plan ---------------------------

NAMES = [f"s{i}" for i in range(6)]


def _objects(spec: dict[str, tuple[int, int, bool]]) -> list[dict]:  # type: ignore[type-arg]
    objs: list[dict] = [NODE]  # type: ignore[type-arg]
    for i, name in enumerate(NAMES):
        if name not in spec:
            continue
        n_eps, node_port, local = spec[name]
        kw = {"type": "NodePort", "ports": [{"name": "http", "port": 80,
                                            "nodePort": 30000 + i}]} if node_port else {}
        if local:
            kw["internalTrafficPolicy"] = "Local"
        objs.append(service(name, cluster_ip=f"10.96.1.{i}", **kw))
        objs.append(slice_(name, endpoints=[endpoint(f"10.244.{i}.{j}", f"node-{'ab'[j % 2]}")
                                            for j in range(n_eps)]))
    return objs


SPEC = st.dictionaries(st.sampled_from(NAMES),
                       st.tuples(st.integers(0, 3), st.booleans(), st.booleans()))


@settings(max_examples=60, deadline=None)
@given(before=SPEC, after=SPEC)
def test_partial_replan_equals_full_plan(before, after) -> None:  # type: ignore[no-untyped-def]
    config = Config()
    host = PluginHost(config)
    host.configure()
    planner = Planner(host)
    s1 = build_state(_objects(before))
    ctx = make_context(config, "node-a", s1.node)
    p1, _ = planner.plan_full(ctx, s1, ServiceMap())
    s2 = build_state(_objects(after))
    dirty = {f"default/{n}" for n in NAMES if before.get(n) != after.get(n)}
    partial, delta = planner.plan_partial(ctx, s2, p1, dirty)
    full, full_delta = planner.plan_full(ctx, s2, p1)
    assert dict(partial.frontends) == dict(full.frontends)
    assert dict(partial.services) == dict(full.services)
    assert {k: set(v) for k, v in partial.by_service.items() if v} == \
        {k: set(v) for k, v in full.by_service.items() if v}
    assert delta == full_delta


def test_example_cluster_config_is_valid() -> None:
    text = textwrap.dedent("""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
    """)
    assert parse_config(text, "x").kube_proxy.mode == "ipvs"
