"""Endpoint selection: every rule of kube-proxy's CategorizeEndpoints
(kube-proxy's pkg/proxy/topology.go)."""

from __future__ import annotations

from factories import endpoint, slice_

from svcproxy.endpoints import Candidate, categorize, endpoints_for_port
from svcproxy.ir import Backend
from svcproxy.model import parse_endpoint_slice

NODE = "node-a"


def cand(ip: str, *, local: bool = False, ready: bool = True, serving: bool | None = None,
         terminating: bool = False, zones: tuple[str, ...] = (),
         nodes: tuple[str, ...] = ()) -> Candidate:
    return Candidate(Backend(ip, 80, ready=ready, serving=ready if serving is None else serving,
                             terminating=terminating, local=local,
                             node_name=NODE if local else "other"),
                     frozenset(zones), frozenset(nodes))


def ips(backends: tuple[Backend, ...]) -> list[str]:
    return [b.address for b in backends]


def cat(cands: list[Candidate], *, cluster: bool = True, local: bool = False, zone: str = "z1",
        prefer_node: bool = True):  # type: ignore[no-untyped-def]
    return categorize(cands, uses_cluster=cluster, uses_local=local, node_name=NODE, zone=zone,
                      prefer_same_node=prefer_node)


def test_cluster_uses_ready_endpoints_only() -> None:
    r = cat([cand("1.0.0.1"), cand("1.0.0.2", ready=False),
             cand("1.0.0.3", ready=False, serving=True, terminating=True)])
    assert ips(r.cluster) == ["1.0.0.1"] and r.has_any and r.local == ()


def test_cluster_falls_back_to_serving_terminating() -> None:
    r = cat([cand("1.0.0.1", ready=False),
             cand("1.0.0.2", ready=False, serving=True, terminating=True),
             cand("1.0.0.3", ready=False, serving=False, terminating=True)])
    assert ips(r.cluster) == ["1.0.0.2"] and r.has_any


def test_no_usable_endpoints() -> None:
    r = cat([cand("1.0.0.1", ready=False), cand("1.0.0.2", ready=False, serving=False,
                                                terminating=True)])
    assert r.cluster == () and not r.has_any


def test_local_uses_local_ready() -> None:
    r = cat([cand("1.0.0.1", local=True), cand("1.0.0.2"),
             cand("1.0.0.3", local=True, ready=False, serving=True, terminating=True)],
            cluster=False, local=True)
    assert ips(r.local) == ["1.0.0.1"] and r.cluster == () and r.has_any


def test_local_falls_back_to_local_serving_terminating() -> None:
    r = cat([cand("1.0.0.1", local=True, ready=False, serving=True, terminating=True),
             cand("1.0.0.2", ready=True)], cluster=False, local=True)
    assert ips(r.local) == ["1.0.0.1"]


def test_local_none_here_but_some_elsewhere() -> None:
    r = cat([cand("1.0.0.2")], cluster=False, local=True)
    assert r.local == () and r.has_any


def test_local_has_any_counts_remote_terminating() -> None:
    r = cat([cand("1.0.0.2", ready=False, serving=True, terminating=True)], cluster=False,
            local=True)
    assert r.local == () and r.has_any


def test_both_policies() -> None:
    r = cat([cand("1.0.0.1", local=True), cand("1.0.0.2")], cluster=True, local=True)
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"] and ips(r.local) == ["1.0.0.1"]


def test_zone_hints_filter_cluster_endpoints() -> None:
    r = cat([cand("1.0.0.1", zones=("z1",)), cand("1.0.0.2", zones=("z2",)),
             cand("1.0.0.3", zones=("z1", "z2"))])
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.3"] and r.topology == "PreferSameZone"


def test_zone_hints_ignored_when_one_ready_endpoint_lacks_them() -> None:
    r = cat([cand("1.0.0.1", zones=("z1",)), cand("1.0.0.2")])
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"] and r.topology == ""


def test_not_ready_endpoints_do_not_count_for_hints() -> None:
    r = cat([cand("1.0.0.1", zones=("z1",)), cand("1.0.0.2", zones=("z2",)),
             cand("1.0.0.3", ready=False)])
    assert ips(r.cluster) == ["1.0.0.1"]


def test_zone_hints_ignored_when_none_for_this_zone() -> None:
    r = cat([cand("1.0.0.1", zones=("z2",)), cand("1.0.0.2", zones=("z3",))])
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"]


def test_zone_hints_ignored_without_node_zone() -> None:
    r = cat([cand("1.0.0.1", zones=("z1",)), cand("1.0.0.2", zones=("z2",))], zone="")
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"]


def test_node_hints_prefer_same_node() -> None:
    cands = [cand("1.0.0.1", local=True, zones=("z1",), nodes=(NODE,)),
             cand("1.0.0.2", zones=("z1",), nodes=("other",))]
    r = cat(cands)
    assert ips(r.cluster) == ["1.0.0.1"] and r.topology == "PreferSameNode"
    # with the PreferSameTrafficDistribution gate off, node hints are not used
    r = cat(cands, prefer_node=False)
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"] and r.topology == "PreferSameZone"


def test_node_hints_without_one_for_this_node_fall_back_to_zone() -> None:
    r = cat([cand("1.0.0.1", zones=("z1",), nodes=("n2",)),
             cand("1.0.0.2", zones=("z2",), nodes=("n3",))])
    assert ips(r.cluster) == ["1.0.0.1"] and r.topology == "PreferSameZone"


def test_terminating_fallback_ignores_topology() -> None:
    r = cat([cand("1.0.0.1", ready=False, serving=True, terminating=True, zones=("z2",)),
             cand("1.0.0.2", ready=False, serving=True, terminating=True, zones=("z1",))])
    assert ips(r.cluster) == ["1.0.0.1", "1.0.0.2"]


def test_endpoints_for_port_matches_name_protocol_family_and_dedups() -> None:
    a = parse_endpoint_slice(slice_(name="a", endpoints=[
        endpoint("10.0.0.1", "node-b"), endpoint("10.0.0.2", "node-b"),
        {"addresses": [], "conditions": {}}],
        ports=[{"name": "http", "port": 8080}, {"name": "http", "port": 53, "protocol": "UDP"},
               {"name": "other", "port": 9090}, {"name": "http", "port": None}]))
    b = parse_endpoint_slice(slice_(name="b", endpoints=[endpoint("10.0.0.1", NODE)],
                                    ports=[{"name": "http", "port": 8080}]))
    v6 = parse_endpoint_slice(slice_(name="c", address_type="IPv6",
                                     endpoints=[endpoint("fd00::1", NODE)]))
    found = endpoints_for_port([b, a, v6], "http", "TCP", 4, NODE)
    assert [(c.backend.address, c.backend.port, c.backend.local) for c in found] == \
        [("10.0.0.1", 8080, True), ("10.0.0.2", 8080, False)]
    assert [c.backend.address for c in endpoints_for_port([v6], "http", "TCP", 6, NODE)] == \
        ["fd00::1"]
    assert [c.backend.port for c in endpoints_for_port([a], "http", "UDP", 4, NODE)] == [53, 53]
