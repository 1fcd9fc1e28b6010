"""`svcproxy status` on real iptables counters after real traffic, and
`svcproxy check` on this host: the missing IPVS module reported where the
kernel has none, IPVS ready where it has."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import Node
from factories import endpoint, service, slice_
from netns import Topology, ipvs_available, sh

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
SVCPROXY = str(Path(sys.executable).parent / "svcproxy")


@pytest.mark.parametrize("datapath", ["iptables", "nftables"])
def test_status_counts_connections_per_service_and_endpoint(topo: Topology, tmp_path: Path,
                                                            datapath: str) -> None:
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    objects = [service("web", cluster_ip="10.96.0.10", ports=HTTP),
               slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                        endpoint("10.244.2.12", "node-b")]),
               service("idle", cluster_ip="10.96.0.11", ports=HTTP),
               slice_("idle", endpoints=[endpoint("10.244.1.11", "node-a")])]
    n = Node(topo, datapath=datapath)
    for obj in objects:
        n.publish(obj)
    n.sync()
    answers = topo.answers("c1", "http", "10.96.0.10", 80, 24)
    assert sum(answers.values()) == 24 and set(answers) == {"a", "b"}
    manifests = tmp_path / "cluster"
    manifests.mkdir()
    (manifests / "all.yaml").write_text(yaml.safe_dump_all(objects))
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: {datapath}
        metricsBindAddress: ""
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapathOptions:
          iptables: {{netns: {topo.node}}}
          nftables: {{netns: {topo.node}}}
    """))
    args = [SVCPROXY, "status", "--config", str(config), "--manifests", str(manifests),
            "--node", "node-a"]
    proc = subprocess.run([*args, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["datapath"] == datapath
    web = next(f for f in view["frontends"] if f["address"] == "10.96.0.10")
    assert (web["service"], web["kind"], web["port"]) == ("default/web:http", "cluster IP", 80)
    assert web["packets"] == 24  # one per new connection
    per_pod = {b["endpoint"]: b["packets"] for b in web["backends"]}
    assert per_pod == {"10.244.1.11:8080": answers["a"], "10.244.2.12:8080": answers["b"]}
    idle = next(f for f in view["frontends"] if f["address"] == "10.96.0.11")
    assert idle["packets"] == 0
    table = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if "10.96.0.10:80" in x)
    assert line.split()[2] == "24" and line.endswith("default/web:http (cluster IP)")


def test_check_reports_the_missing_ipvs_module(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                      "kind: KubeProxyConfiguration\nmode: ipvs\n")
    proc = subprocess.run([SVCPROXY, "check", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    if ipvs_available():
        assert "configured mode ipvs: ready" in proc.stdout, proc.stdout + proc.stderr
        assert "[FAIL] ipvs" not in proc.stdout
        return
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the configured mode cannot run
    assert "[FAIL] ipvs" in proc.stdout
    assert "the ip_vs kernel module is not loaded and cannot be loaded" in proc.stdout
    assert "fix: modprobe ip_vs" in proc.stdout
    assert "configured mode ipvs: BLOCKED" in proc.stdout
    assert "svcproxy would fall back to nftables" in proc.stdout
    assert "[ok  ] iptables (IPv4)" in proc.stdout
    report = json.loads(subprocess.run([SVCPROXY, "check", "--config", str(config), "-o",
                                        "json"], capture_output=True, text=True,
                                       timeout=60).stdout)
    assert report["blocked"] is True and report["fallback"] == "nftables"
    # iptables mode is not blocked by the missing module
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                      "kind: KubeProxyConfiguration\nmode: iptables\n")
    proc = subprocess.run([SVCPROXY, "check", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert "configured mode iptables: ready" in proc.stdout


def test_check_reports_the_nftables_requirements(topo: Topology, tmp_path: Path) -> None:
    """mode: nftables: the kernel (>= 5.13) and nft (>= 1.0.1) checks, and the
    functional probe (a throwaway table committed in the node namespace)."""
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: nftables
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapathOptions:
          nftables: {{netns: {topo.node}}}
          iptables: {{netns: {topo.node}}}
    """))
    proc = subprocess.run([SVCPROXY, "check", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernel = next(ln for ln in proc.stdout.splitlines() if "kernel for nftables" in ln)
    assert kernel.startswith("[ok  ]") and "(>= 5.13)" in kernel
    nft = next(ln for ln in proc.stdout.splitlines() if ln.startswith("[ok  ] nft "))
    assert "(>= 1.0.1), a test table with a verdict map commits" in nft
    assert "configured mode nftables: ready" in proc.stdout
    assert "kube-proxy" not in sh("nft", "list", "tables", netns=topo.node).stdout


def test_check_judges_strict_arp_in_the_configured_scope() -> None:
    """arpScope interfaces: strict ARP on the uplinks (and kube-ipvs0) is strict
    even when conf/all is not — the kernel uses the larger value; it used to be
    judged from conf/all alone, a false warning."""
    from svcproxy.config import parse_config
    from svcproxy.plugins.metallb import MetallbPlugin

    ns = "svparpcheck"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def sh(*args: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True)

        sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        sh("ip", "addr", "add", "192.0.2.1/24", "dev", "up0")
        sh("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=0", "net.ipv4.conf.all.arp_announce=0",
           "net.ipv4.conf.up0.arp_ignore=1", "net.ipv4.conf.up0.arp_announce=2")
        config = parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                              "kind: KubeProxyConfiguration\nmode: ipvs\n"
                              "ipvs: {strictARP: true}\n", "c.yaml")
        states = {}
        for scope in ("interfaces", "all"):
            plugin = MetallbPlugin()
            plugin.svcproxy_configure_plugin(config, {"arpScope": scope, "netns": ns,
                                                      "sysctlBackup": "/nonexistent/x"})
            (item,) = plugin.svcproxy_check(config)
            states[scope] = (item.state, item.detail)
        assert states["interfaces"][0] == "ok", states
        assert "up0: arp_ignore=1, arp_announce=2" in states["interfaces"][1]
        assert states["all"][0] == "warn" and "not in effect on all" in states["all"][1]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
