"""Parsing Services, EndpointSlices and Nodes from API dicts."""

from __future__ import annotations

import pytest
from factories import endpoint, node, service, slice_

from svcproxy.errors import ObjectError
from svcproxy.model import (
    parse_endpoint_slice,
    parse_node,
    parse_object,
    parse_service,
)


def test_service_defaults() -> None:
    raw = service(ports=[{"port": 80}])
    s = parse_service(raw)
    assert s.key == "default/web"
    p = s.ports[0]
    assert (p.name, p.protocol, p.port, p.target_port, p.node_port) == ("", "TCP", 80, 80, 0)
    assert s.session_affinity == "None" and s.affinity_timeout == 10800
    assert s.external_traffic_policy == s.internal_traffic_policy == "Cluster"
    assert s.ignore_reason is None and not s.externally_accessible


def test_service_full() -> None:
    s = parse_service(service(
        type="LoadBalancer", cluster_ip=["10.96.0.5", "fd00::5"],
        ports=[{"name": "https", "port": 443, "targetPort": "https", "nodePort": 31000,
                "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        externalIPs=["192.0.2.1"], loadBalancerSourceRanges=["198.51.100.0/24 "],
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        externalTrafficPolicy="Local", internalTrafficPolicy="Local", healthCheckNodePort=32000,
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.1"},
                                             {"ip": "203.0.113.2", "ipMode": "Proxy"},
                                             {"hostname": "lb.example.com"}]}},
        labels={"app": "x"}, annotations={"a": "b"}))
    assert s.cluster_ips == ("10.96.0.5", "fd00::5")
    assert s.ports[0].target_port == "https" and s.ports[0].node_port == 31000
    assert s.ports[1].protocol == "UDP"
    assert s.load_balancer_source_ranges == ("198.51.100.0/24",)
    assert [i.ip_mode for i in s.load_balancer_ingress] == ["VIP", "Proxy", "VIP"]
    assert s.load_balancer_ingress[2].hostname == "lb.example.com"
    assert s.affinity_timeout == 60
    assert s.health_check_node_port == 32000
    assert s.externally_accessible
    assert s.label("app") == "x" and s.annotation("a") == "b"


def test_global_is_cluster() -> None:
    assert parse_service(service(externalTrafficPolicy="Global")).external_traffic_policy == \
        "Cluster"


@pytest.mark.parametrize("raw,reason", [
    (service(cluster_ip="None"), "headless"),
    (service(type="ExternalName", cluster_ip="", externalName="db.example.com"), "ExternalName"),
    (service(labels={"service.kubernetes.io/service-proxy-name": "cilium"}),
     "owned by another proxy"),
    (service(cluster_ip=""), "no clusterIP"),
])
def test_ignored_services(raw: dict, reason: str) -> None:  # type: ignore[type-arg]
    if raw["spec"]["clusterIP"] == "":
        raw["spec"]["clusterIPs"] = []
    assert reason in (parse_service(raw).ignore_reason or "")


@pytest.mark.parametrize("mutate,field,value", [
    (lambda s: s["spec"]["ports"][0].update(port=70000), "spec.ports[0].port", 70000),
    (lambda s: s["spec"]["ports"][0].update(port="80"), "spec.ports[0].port", "80"),
    (lambda s: s["spec"]["ports"][0].pop("port"), "spec.ports[0].port", None),
    (lambda s: s["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol", "ICMP"),
    (lambda s: s["spec"]["ports"][0].update(targetPort=0), "spec.ports[0].targetPort", 0),
    (lambda s: s["spec"]["ports"][0].update(nodePort=-1), "spec.ports[0].nodePort", -1),
    (lambda s: s["spec"].update(clusterIPs=["10.0.0.300"]), "spec.clusterIPs[0]", "10.0.0.300"),
    (lambda s: s["spec"].update(clusterIPs=["10.0.0.1", "10.0.0.2"]), "spec.clusterIPs", None),
    (lambda s: s["spec"].update(type="Magic"), "spec.type", "Magic"),
    (lambda s: s["spec"].update(sessionAffinity="Cookie"), "spec.sessionAffinity", "Cookie"),
    (lambda s: s["spec"].update(externalTrafficPolicy="Nearby"), "spec.externalTrafficPolicy",
     "Nearby"),
    (lambda s: s["spec"].update(externalIPs=["x"]), "spec.externalIPs[0]", "x"),
    (lambda s: s["spec"].update(loadBalancerSourceRanges=["1.2.3.0/40"]),
     "spec.loadBalancerSourceRanges[0]", "1.2.3.0/40"),
    (lambda s: s["spec"].update(ports=[{"port": 80}, {"port": 81}]), "spec.ports[0].name", ""),
    (lambda s: s["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
     "spec.ports[1].port", 80),
    (lambda s: s["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": 0}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 0),
    (lambda s: s["metadata"].pop("name"), "metadata.name", None),
])
def test_malformed_service_names_object_and_field(mutate, field, value) -> None:  # type: ignore[no-untyped-def]
    raw = service(name="broken", namespace="ns1")
    mutate(raw)
    with pytest.raises(ObjectError) as exc:
        parse_service(raw)
    assert exc.value.field == field
    if value is not None:
        assert exc.value.value == value
    assert str(exc.value).startswith("Service ns1/")


def test_endpoint_conditions_nil_defaults() -> None:
    eps = parse_endpoint_slice(slice_(endpoints=[
        endpoint("10.0.0.1", ready=None),
        endpoint("10.0.0.2", ready=False),
        endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
        endpoint("10.0.0.4", ready=True, serving=None, terminating=None),
    ]))
    conds = [(e.ready, e.serving, e.terminating) for e in eps.endpoints]
    assert conds == [(True, True, False), (False, False, False), (False, True, True),
                     (True, True, False)]
    assert eps.service_key == "default/web"


def test_slice_hints_and_ports() -> None:
    eps = parse_endpoint_slice(slice_(
        endpoints=[endpoint("10.0.0.1", "n1", zones=["z1"], nodes=["n1"])],
        ports=[{"name": "http", "port": None}, {"port": 53, "protocol": "UDP"}]))
    assert eps.endpoints[0].hint_zones == ("z1",) and eps.endpoints[0].hint_nodes == ("n1",)
    assert eps.ports[0].port is None
    assert (eps.ports[1].name, eps.ports[1].protocol) == ("", "UDP")


@pytest.mark.parametrize("mutate,field", [
    (lambda s: s.update(addressType="IPv5"), "addressType"),
    (lambda s: s["endpoints"][0].update(addresses=["fd00::1"]), "endpoints[0].addresses[0]"),
    (lambda s: s["endpoints"][0].update(conditions={"ready": "yes"}),
     "endpoints[0].conditions.ready"),
    (lambda s: s["ports"][0].update(port=0), "ports[0].port"),
    (lambda s: s["ports"][0].update(protocol="tcp"), "ports[0].protocol"),
])
def test_malformed_slice(mutate, field) -> None:  # type: ignore[no-untyped-def]
    raw = slice_(endpoints=[endpoint("10.0.0.1")])
    mutate(raw)
    with pytest.raises(ObjectError) as exc:
        parse_endpoint_slice(raw)
    assert exc.value.field == field
    assert str(exc.value).startswith("EndpointSlice default/web-abc")


def test_node() -> None:
    n = parse_node(node("n1", ips=["10.0.0.1", "fd00::1"], zone="z1"))
    assert n.ips() == ("10.0.0.1", "fd00::1") and n.zone == "z1" and n.key == "n1"
    with pytest.raises(ObjectError, match=r"status\.addresses\[0\]\.address"):
        raw = node()
        raw["status"]["addresses"][0]["address"] = "not-an-ip"
        parse_node(raw)


def test_parse_object_dispatch_and_unknown_kind() -> None:
    assert parse_object(node()).kind == "Node"
    with pytest.raises(ObjectError, match="kind"):
        parse_object({"kind": "Pod", "metadata": {"name": "x"}})


def test_content_equality_ignores_resource_version() -> None:
    a = service()
    b = service()
    b["metadata"]["resourceVersion"] = "99"
    assert parse_service(a) == parse_service(b)


def test_ip_address_pool_ranges_and_errors() -> None:
    """MetalLB's pools are the metallb plugin's kind (parsed there, not in core)."""
    from svcproxy.plugins.metallb.pools import parse_ip_address_pool as parse_object

    pool = parse_object({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                         "metadata": {"name": "p", "namespace": "metallb-system"},
                         "spec": {"addresses": ["192.168.10.0/24", "10.0.0.5-10.0.0.9",
                                                "fd00::/120"]}})
    assert pool.key == "metallb-system/p"
    for ip, inside in (("192.168.10.255", True), ("192.168.11.0", False), ("10.0.0.5", True),
                       ("10.0.0.9", True), ("10.0.0.10", False), ("fd00::ff", True),
                       ("fd00::100", False)):
        assert pool.contains(ip) is inside, ip
    with pytest.raises(ObjectError, match=r"spec\.addresses\[1\].*10\.0\.0\.9-10\.0\.0\.5"):
        parse_object({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                      "metadata": {"name": "p", "namespace": "m"},
                      "spec": {"addresses": ["10.0.0.0/8", "10.0.0.9-10.0.0.5"]}})


def test_ip_fast_path_agrees_with_ipaddress() -> None:
    """The dotted-quad fast path (socket.inet_pton) accepts and spells exactly
    what ipaddress does: canonical addresses pass, leading zeros and other
    non-canonical spellings are refused or normalised as before."""
    import ipaddress

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from svcproxy.model import _Reader

    part = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "010", "0x1", "", " 1"]))
    text = st.one_of(st.lists(part, min_size=1, max_size=5).map(".".join),
                     st.sampled_from(["::1", "fd00::10", "::ffff:1.2.3.4", "1.2.3.4 "]))

    reader = _Reader("EndpointSlice", {"metadata": {"name": "x"}})

    @settings(max_examples=300, deadline=None)
    @given(text)
    def check(value: str) -> None:
        try:
            want: str | None = str(ipaddress.ip_address(value))
        except ValueError:
            want = None
        try:
            got: str | None = reader.ip(value, "x")
        except ObjectError:
            got = None
        assert got == want, value

    check()


def test_an_address_with_a_nul_is_refused_naming_the_field() -> None:
    """The dotted-quad fast path (inet_pton) raises ValueError, not OSError,
    for an embedded NUL; it must still end as the usual ObjectError (found by
    test_fuzz.py)."""
    bad = node("node-a", ips=["192.168.1.10"])
    bad["status"]["addresses"][0]["address"] = "1.2.3.4\x00"
    with pytest.raises(ObjectError, match=r"status\.addresses\[0\]\.address: not a valid IP"):
        parse_object(bad)
