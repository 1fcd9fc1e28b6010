"""The IPVS datapath when the real kernel refuses part of a sync: an ipset at
its maxelem and an IPVS message refused in the middle of a batch, with real
traffic (the host tier's tests/host/test_faults.py has the source and
xtables faults, with the real process and its metrics)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from factories import endpoint, service, slice_
from netns import Topology, ipset_save, sh
from test_ipvs_datapath import HTTP, IpvsNode

from svcproxy.bus import EventType

PODS = {"a": "10.244.1.11", "b": "10.244.1.12", "c": "10.244.2.13"}
SLICE = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def svc(n: int, *pods: str) -> list[dict]:  # type: ignore[type-arg]
    return [service(f"svc{n}", cluster_ip=f"10.96.0.1{n}", ports=HTTP),
            slice_(f"svc{n}", ports=SLICE, endpoints=[endpoint(PODS[p]) for p in pods])]


def test_refusals_leave_the_rest_serving_and_converge(topo: Topology, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """KUBE-CLUSTER-IP was made with room for two members (as a set at
    kube-proxy's 65536 would be on a very large cluster), and another program
    created a virtual server at the address a new Service gets (EEXIST in the
    middle of svcproxy's batch). One sync then adds two Services and changes a
    third: the kernel refuses two set members and one IPVS message; everything
    else is written (the changed Service answers from its new endpoints at
    once) and the error names each refusal and its Service. The retry adopts
    the virtual server (a different fault: logged), the next fails the same
    way and is not logged again, and when the set is replaced by a large one
    the next sync converges: every Service answers and every helper set equals
    the plan."""
    from svcproxy.plugins.ipvs.helpers import SETS, set_entries

    for name, ip in PODS.items():
        topo.add_pod(name, ip)
    sh("ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port", "maxelem", "2", netns=topo.node)
    n = IpvsNode(topo, tmp_path)
    for obj in [*svc(1, "a"), *svc(2, "b")]:
        n.publish(obj)
    n.sync()
    assert topo.answers("c1", "http", "10.96.0.11", 80, 2) == {"a": 2}
    # another program (a second proxy during a botched takeover, say)
    sh("ipvsadm", "-A", "-t", "10.96.0.14:80", "-s", "rr", netns=topo.node)
    for obj in [*svc(3, "c"), *svc(4, "c")]:
        n.publish(obj)
    n.publish(svc(1, "a", "b")[1], EventType.MODIFIED)
    caplog.set_level(logging.DEBUG, logger="svcproxy.proxy")
    result = n.proxy.sync()
    assert not result.ok and not result.full
    error = result.error
    assert ("ipset KUBE-CLUSTER-IP: cannot add 10.96.0.13,tcp:80 (Service default/svc3:http): "
            "the set is full") in error, error
    assert "cannot add 10.96.0.14,tcp:80 (Service default/svc4:http)" in error, error
    assert "TCP 10.96.0.14:80: File exists (errno 17) (Service default/svc4:http)" in error
    # the rest went in: svc1's new endpoint serves, svc2 is untouched
    assert set(topo.answers("c1", "http", "10.96.0.11", 80, 6)) == {"a", "b"}
    assert topo.answers("c1", "http", "10.96.0.12", 80, 2) == {"b": 2}
    # svc3 is refused quickly (in KUBE-IPVS-IPS, not yet in KUBE-CLUSTER-IP), not
    # blackholed
    assert topo.answers("c1", "http", "10.96.0.13", 80, 1) == {"!refused": 1}
    # the retry (full, as after any failure) adopts the virtual server the other
    # program made at svc4's address (it is planned); the set is still full
    again = n.proxy.sync()
    assert not again.ok and again.full
    assert "File exists" not in again.error and "svc3" in again.error
    third = n.proxy.sync()  # the same fault again: not logged again
    assert third.error == again.error
    logged = [r for r in caplog.records if r.name == "svcproxy.proxy" and "failed" in r.message]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.ERROR, logging.DEBUG]
    # the fault clears: the set is replaced by one with kube-proxy's room
    sh("ipset", "create", "KUBE-CLUSTER-IP-NEW", "hash:ip,port", "maxelem", "65536",
       netns=topo.node)
    sh("ipset", "swap", "KUBE-CLUSTER-IP-NEW", "KUBE-CLUSTER-IP", netns=topo.node)
    sh("ipset", "destroy", "KUBE-CLUSTER-IP-NEW", netns=topo.node)
    n.sync()
    for i, pods in ((1, {"a", "b"}), (2, {"b"}), (3, {"c"}), (4, {"c"})):
        assert set(topo.answers("c1", "http", f"10.96.0.1{i}", 80, 4)) == pods, i
    plan = n.proxy.applied
    bound = {fe.address for fe in plan.frontends.values() if fe.bind_address}
    want, _ = set_entries(plan, bound, 4, "192.168.100.1")
    have = ipset_save(topo.node)
    for name in SETS:
        assert have.get(name) == want[name], name
    assert any("synced again after 3 failed attempts" in r.message for r in caplog.records)
