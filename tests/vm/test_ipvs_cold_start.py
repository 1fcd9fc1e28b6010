"""Cold start on the real IPVS kernel, with traffic: a restarted svcproxy
writes the API server's and the cluster DNS's virtual servers, set members
and addresses first; while it does, every other Service the node already held
keeps answering with its virtual server, real servers and set members
unchanged; then the full sync brings the node to the cluster as it is now.
(tests/host/test_netfilter_cold_start.py: the same for iptables and nftables.)"""

from __future__ import annotations

import textwrap
from collections.abc import Generator
from pathlib import Path
from typing import Any

from factories import ProxyHarness, endpoint, service, slice_
from netns import Topology, ipset_save, sh

from svcproxy import hookimpl
from svcproxy.datapath import ApplyResult

NODE_IP = "192.168.100.1"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
SLICE_DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def node(topo: Topology, tmp: Path, cold: bool, plugins: list[tuple[str, Any]] | None = None
         ) -> ProxyHarness:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        clusterCIDR: 10.244.0.0/16
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [ipvs]
        coldStart: {{minServices: {0 if cold else 1000}}}
        datapathOptions:
          ipvs: {{netns: {topo.node}, drainTimeout: 0, sysctlBackup: {tmp / 'sysctl.json'}}}
    """)
    n = ProxyHarness(text, "ipvs", [NODE_IP], extra_plugins=plugins)
    assert n.host.select_datapath()[0] == "ipvs"
    return n


def publish(n: ProxyHarness, api_pod: str, with_old: bool) -> None:
    n.publish(service("kubernetes", cluster_ip="10.96.0.1", ports=HTTP))
    n.publish(slice_("kubernetes", endpoints=[endpoint(api_pod, "node-b")], ports=SLICE_HTTP))
    n.publish(service("coredns", "kube-system", cluster_ip="10.96.0.10", ports=DNS,
                      labels={"k8s-app": "kube-dns"}))
    n.publish(slice_("coredns", "kube-system", endpoints=[endpoint("10.244.2.12", "node-b")],
                     ports=SLICE_DNS))
    for name, ip in [("app", "10.96.0.20"), *([("old", "10.96.0.30")] if with_old else [])]:
        n.publish(service(name, cluster_ip=ip, ports=HTTP))
        n.publish(slice_(name, endpoints=[endpoint("10.244.2.12", "node-b")], ports=SLICE_HTTP))


def kernel(topo: Topology) -> dict[str, Any]:
    return {"ipvs": sh("ipvsadm", "-S", "-n", netns=topo.node).stdout.splitlines(),
            "sets": ipset_save(topo.node)}


class Between:
    """Looks at the node right after the cold-start write, before the full sync."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.seen: dict[str, Any] = {}

    @hookimpl(wrapper=True)
    def svcproxy_apply_first(self) -> Generator[None, ApplyResult | None, ApplyResult | None]:
        result = yield
        t = self.topo
        self.seen = {"api": t.answers("c1", "http", "10.96.0.1", 80, 3),
                     "dns": t.answers("c1", "udp", "10.96.0.10", 53, 1),
                     "app": t.answers("c1", "http", "10.96.0.20", 80, 2),
                     "old": t.answers("c1", "http", "10.96.0.30", 80, 2),
                     "kernel": kernel(t)}
        return result


def test_a_restart_writes_api_server_and_dns_first_and_keeps_the_rest_serving(
        topo: Topology, tmp_path: Path) -> None:
    for name, ip in (("api1", "10.244.1.21"), ("api2", "10.244.1.22"), ("app", "10.244.2.12")):
        topo.add_pod(name, ip)
    before = node(topo, tmp_path, cold=False)
    publish(before, "10.244.1.21", with_old=True)
    before.sync()
    held = kernel(topo)
    probe = Between(topo)
    after = node(topo, tmp_path, cold=True, plugins=[("between", probe)])
    publish(after, "10.244.1.22", with_old=False)  # the API server moved, "old" went
    result = after.sync()
    seen = probe.seen
    assert seen, "the cold-start write did not run"
    assert seen["api"] == {"api2": 3} and seen["dns"] == {"app": 1}, seen
    assert seen["app"] == {"app": 2} and seen["old"] == {"app": 2}, seen
    others = [line for line in held["ipvs"] if "10.96.0.20" in line or "10.96.0.30" in line]
    assert others and all(line in seen["kernel"]["ipvs"] for line in others)
    for name, members in held["sets"].items():
        assert members <= seen["kernel"]["sets"].get(name, set()), name  # nothing removed
    assert result.full and result.apply.details["cold_start_changes"] > 0
    after_full = kernel(topo)
    assert not any("10.96.0.30" in line for line in after_full["ipvs"])
    assert topo.answers("c1", "http", "10.96.0.20", 80, 2) == {"app": 2}
    assert topo.answers("c1", "http", "10.96.0.1", 80, 2) == {"api2": 2}
