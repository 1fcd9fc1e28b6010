"""svcproxy as the DaemonSet runs it without `privileged: true`: `svcproxy
prepare` in a privileged init container, then `svcproxy run` with only the
capabilities deploy/daemonset.yaml grants and a read-only /proc/sys (what a
container runtime gives a non-privileged container). The capability list is
read from the shipped manifest, so the manifest and this test cannot drift
apart. (The IPVS datapath's run is tests/vm/test_ipvs_datapath.py's
`test_run_once_programs_what_plan_prints`.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NODE_IP
from factories import config_text, endpoint, node, service, slice_
from netns import (
    Topology,
    daemonset_containers,
    has_capability,
    sh,
    shipped_capabilities,
    unprivileged,
)

SVCPROXY = str(Path(sys.executable).parent / "svcproxy")
LOCALNET = "net.ipv4.conf.all.route_localnet"


def write_cluster(tmp_path: Path) -> Path:
    """A manifest directory: web (ClusterIP and NodePort 30080) -> pod a."""
    d = tmp_path / "manifests"
    d.mkdir()
    objs = [node("node-a", ips=[NODE_IP]),
            service("web", cluster_ip="10.96.0.10", type="NodePort", ports=[
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                 "nodePort": 30080}]),
            slice_("web", ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
                   endpoints=[endpoint("10.244.1.11", "node-a")])]
    (d / "cluster.json").write_text(json.dumps({"kind": "List", "items": objs}))
    return d


def test_the_manifest_runs_prepare_privileged_and_the_proxy_without() -> None:
    containers = daemonset_containers()
    init = containers["prepare"]
    assert init["command"][:2] == ["svcproxy", "prepare"]
    assert init["securityContext"]["privileged"] is True
    assert sorted(shipped_capabilities()) == ["net_admin", "net_raw", "sys_resource"]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_run_without_privileges_after_prepare(topo: Topology, tmp_path: Path,
                                              backend: str) -> None:
    """Without `prepare`, the unprivileged run programs every rule but cannot
    set route_localnet: it says so once, naming the sysctl and the way out,
    and exits 0. `prepare` (privileged) sets it; the unprivileged run then
    warns about nothing, and the NodePort answers on 127.0.0.1 too. Both
    iptables backends (legacy needs NET_RAW, which is why it is granted)."""
    topo.add_pod("a", "10.244.1.11")
    d = write_cluster(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config_text(
        {"mode": "iptables", "clusterCIDR": "10.244.0.0/16", "healthzBindAddress": "",
         "metricsBindAddress": "", "oomScoreAdj": -999},
        disable=["conntrack"], datapaths=["iptables"],
        datapathOptions={"iptables": {"backend": backend,
                                      "sysctlBackup": str(tmp_path / "sysctl.json")}}))
    run = ["run", "--once", "--manifests", str(d), "--config", str(config), "--node", "node-a",
           "--status-socket", ""]
    assert sh("sysctl", "-n", LOCALNET, netns=topo.node).stdout.strip() == "0"
    first = unprivileged(topo.node, *run)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    warned = [line for line in first.stderr.splitlines() if " WARNING " in line]
    assert len(warned) == 1, first.stderr
    assert f"cannot set {LOCALNET} to 1 (Read-only file system); run `svcproxy prepare`" \
        in warned[0]
    if has_capability("sys_resource"):  # some sandboxes lack it even for root
        assert "oomScoreAdj" not in first.stderr  # SYS_RESOURCE lets it lower the score
    assert topo.answers("c1", "http", "10.96.0.10", 80, 2) == {"a": 2}
    assert sh("sysctl", "-n", LOCALNET, netns=topo.node).stdout.strip() == "0"

    prepared = subprocess.run(["ip", "netns", "exec", topo.node, SVCPROXY, "prepare",
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.splitlines() == [f"sysctl {LOCALNET}=1",
                                            "node prepared for the iptables datapath"]
    second = unprivileged(topo.node, *run)
    assert second.returncode == 0, second.stderr
    assert " WARNING " not in second.stderr, second.stderr
    topo.clients["node"] = topo.node
    assert topo.answers("node", "http", "127.0.0.1", 30080, 2) == {"a": 2}
    assert topo.answers("c1", "http", NODE_IP, 30080, 2) == {"a": 2}


def test_nftables_runs_with_the_manifests_capabilities(topo: Topology, tmp_path: Path) -> None:
    """The nftables datapath needs NET_ADMIN only and no sysctl: the
    unprivileged run programs the table, warns about nothing, and serves."""
    topo.add_pod("a", "10.244.1.11")
    d = write_cluster(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(config_text(
        {"mode": "nftables", "clusterCIDR": "10.244.0.0/16", "healthzBindAddress": "",
         "metricsBindAddress": "", "oomScoreAdj": -999},
        disable=["conntrack"], datapaths=["nftables"]))
    prepared = subprocess.run(["ip", "netns", "exec", topo.node, SVCPROXY, "prepare",
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.splitlines() == [
        "node prepared for the nftables datapath: nothing to change"]
    run = unprivileged(topo.node, "run", "--once", "--manifests", str(d), "--config",
                       str(config), "--node", "node-a", "--status-socket", "")
    assert run.returncode == 0, run.stderr
    assert " WARNING " not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert topo.answers("c1", "http", "10.96.0.10", 80, 2) == {"a": 2}
    assert topo.answers("c1", "http", NODE_IP, 30080, 2) == {"a": 2}
