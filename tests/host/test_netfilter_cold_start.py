"""Cold start with the real kernel and traffic (both netfilter datapaths): a
restarted svcproxy writes the API server's and the cluster DNS's Services
first, and while it does, every other Service the kernel already held keeps
answering and keeps its rules; then the full sync brings everything to the
cluster as it is now. tests/unit/test_cold_start.py checks the same writes
against fakes, the core's choice and order, and IPVS's."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from conftest import Node
from factories import endpoint, service, slice_
from netns import Topology, sh

from svcproxy import hookimpl
from svcproxy.datapath import ApplyResult

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
SLICE_DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def kernel_view(topo: Topology, datapath: str) -> str:
    if datapath == "nftables":
        return sh("nft", "list", "table", "ip", "kube-proxy", netns=topo.node).stdout
    return sh("iptables-save", "-t", "nat", netns=topo.node).stdout


def publish_cluster(n: Node, api_pod: str, with_old: bool) -> None:
    n.publish(service("kubernetes", cluster_ip="10.96.0.1", ports=HTTP))
    n.publish(slice_("kubernetes", endpoints=[endpoint(api_pod, "node-b")], ports=SLICE_HTTP))
    n.publish(service("coredns", "kube-system", cluster_ip="10.96.0.10", ports=DNS,
                      labels={"k8s-app": "kube-dns"}))
    n.publish(slice_("coredns", "kube-system", endpoints=[endpoint("10.244.1.11", "node-b")],
                     ports=SLICE_DNS))
    n.publish(service("app", cluster_ip="10.96.0.20", ports=HTTP))
    n.publish(slice_("app", endpoints=[endpoint("10.244.2.12", "node-b")], ports=SLICE_HTTP))
    if with_old:
        n.publish(service("old", cluster_ip="10.96.0.30", ports=HTTP))
        n.publish(slice_("old", endpoints=[endpoint("10.244.2.12", "node-b")],
                         ports=SLICE_HTTP))
    for i in range(20):
        n.publish(service(f"filler{i}", cluster_ip=f"10.96.1.{i + 1}", ports=HTTP))


class Between:
    """Looks at the node right after the cold-start write, before the full sync."""

    def __init__(self, topo: Topology, datapath: str) -> None:
        self.topo, self.datapath = topo, datapath
        self.seen: dict[str, Any] = {}

    @hookimpl(wrapper=True)
    def svcproxy_apply_first(self) -> Generator[None, ApplyResult | None, ApplyResult | None]:
        result = yield
        t = self.topo
        self.seen = {
            "api": t.answers("c1", "http", "10.96.0.1", 80, 4),
            "dns": t.answers("c1", "udp", "10.96.0.10", 53, 2),
            "app": t.answers("c1", "http", "10.96.0.20", 80, 3),
            "old": t.answers("c1", "http", "10.96.0.30", 80, 2),
            "kernel": kernel_view(t, self.datapath),
        }
        return result


@pytest.mark.parametrize("datapath", ["iptables", "nftables"])
def test_a_restart_writes_api_server_and_dns_first_and_keeps_the_rest_serving(
        topo: Topology, datapath: str) -> None:
    for name, ip in (("api1", "10.244.1.21"), ("api2", "10.244.1.22"), ("dns", "10.244.1.11"),
                     ("app", "10.244.2.12")):
        topo.add_pod(name, ip)
    before = Node(topo, datapath=datapath)
    publish_cluster(before, "10.244.1.21", with_old=True)
    before.sync()
    assert topo.answers("c1", "http", "10.96.0.1", 80, 2) == {"api1": 2}
    held_before = kernel_view(topo, datapath)
    # svcproxy restarts; meanwhile the API server moved and "old" was deleted
    probe = Between(topo, datapath)
    after = Node(topo, datapath=datapath, svcproxy_config="coldStart: {minServices: 0}\n",
                 extra_plugins=[("between", probe)])
    publish_cluster(after, "10.244.1.22", with_old=False)
    result = after.sync()
    seen = probe.seen
    assert seen, "the cold-start write did not run"
    # the priority Services are current at once...
    assert seen["api"] == {"api2": 4} and seen["dns"] == {"dns": 2}, seen
    # ...and everything else the kernel held still answers, with its rules kept
    assert seen["app"] == {"app": 3} and seen["old"] == {"app": 2}, seen
    kept = [line for line in held_before.splitlines()
            if ("default/app" in line or "default/old" in line) and not line.startswith("#")]
    assert kept and all(line in seen["kernel"] for line in kept), "rules changed"
    # then the full sync: the deleted Service goes, the rest is as it is now
    assert result.full and result.apply.details["cold_start_changes"] > 0
    gone = topo.answers("c1", "http", "10.96.0.30", 80, 2)
    assert set(gone) <= {"!refused", "!timeout"}, gone
    assert topo.answers("c1", "http", "10.96.0.20", 80, 2) == {"app": 2}
    assert topo.answers("c1", "http", "10.96.0.1", 80, 2) == {"api2": 2}
    # and a fresh full sync finds nothing left to write (nftables deletes the
    # deleted Service's emptied chains a moment later, as always)
    again = Node(topo, datapath=datapath)
    publish_cluster(again, "10.244.1.22", with_old=False)
    check = again.sync().apply
    if datapath == "iptables":
        assert check.changes == 0, check.details
    else:
        v4 = check.details["ipv4"]
        assert v4["chains_written"] == v4["elements"] == v4["sets"] == 0, v4
