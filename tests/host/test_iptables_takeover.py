"""Taking over a node that kube-proxy's iptables mode programmed, in place, with
svcproxy's iptables datapath (tests/vm/test_ipvs_takeover.py does the same from
kube-proxy's IPVS mode).

The node's rules are kube-proxy's layout for the cluster as kube-proxy last saw
it — rendered for that older cluster (the layout svcproxy shares with
kube-proxy: chain names by kube-proxy's hashing, tests/unit/test_iptables_rules.py)
and written with `iptables-restore --noflush` by the test, so svcproxy's
reconciler knows nothing of them: web -> a, b, and a Service `old` that has
since been deleted. With TCP connections and UDP flows held open through a
ClusterIP and a NodePort, the preview names the real differences, the first
sync changes exactly those (counted from iptables-save before and after; the
other chains keep their packet counters), every connection still answers, and a
restart of svcproxy itself changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from apiserver import FakeAPIServer
from conftest import NODE_IP, Node
from factories import config_text, endpoint, node, service, slice_
from netns import Topology, sh

from svcproxy.plugins.iptables import rule_options
from svcproxy.plugins.iptables.datapath import render_iptables_save

WEB_VIP, DNS_VIP, OLD_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.99"
WEB = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}]
WEB_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
#: flows held across each step: TCP through a ClusterIP and a NodePort, UDP too
TCP_FLOWS = {"cluster-ip": (WEB_VIP, 80), "node-port": (NODE_IP, 30080)}
UDP_FLOWS = {"udp-cluster-ip": (DNS_VIP, 53), "udp-node-port": (NODE_IP, 30053)}
PODS = {"a": ("10.244.1.11", "node-a"), "b": ("10.244.2.12", "node-b"),
        "c": ("10.244.3.13", "node-c"), "u": ("10.244.1.53", "node-a")}


def cluster(n: Node, web_pods: tuple[str, ...], old: bool) -> None:
    n.publish(service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB))
    n.publish(service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS))
    n.publish(slice_("web", ports=WEB_EP,
                     endpoints=[endpoint(*PODS[p]) for p in web_pods]))
    n.publish(slice_("dns", ports=DNS_EP, endpoints=[endpoint(*PODS["u"])]))
    if old:
        n.publish(service("old", cluster_ip=OLD_VIP, ports=[
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]))
        n.publish(slice_("old", ports=WEB_EP, endpoints=[endpoint(*PODS["b"])]))


def save(ns: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each chain's rules and their counters, as iptables-save -c prints them."""
    rules: dict[str, list[str]] = {}
    counters: dict[str, list[str]] = {}
    for table in ("filter", "nat"):
        for line in sh("iptables-save", "-c", "-t", table, netns=ns).stdout.splitlines():
            if line.startswith(":"):
                key = f"{table}/{line[1:].split()[0]}"
                rules.setdefault(key, [])
                counters.setdefault(key, [])
            elif line.startswith("["):
                count, rule = line.split("] ", 1)
                key = f"{table}/{rule.split()[1]}"
                rules[key].append(rule)
                counters[key].append(count)
    return rules, counters


def kube_proxy_node(topo: Topology) -> None:
    """kube-proxy's rules for the cluster as it last saw it, and its sysctl."""
    for name, (ip, _) in PODS.items():
        topo.add_pod(name, ip)
    last_seen = Node(topo, start=False)
    cluster(last_seen, ("a", "b"), old=True)
    plan = last_seen.plan()
    text = render_iptables_save(plan, rule_options(last_seen.config, 4, plan))
    sh("iptables-restore", "--noflush", stdin=text, netns=topo.node)
    # kube-proxy sets it for NodePorts on 127.0.0.1 (localhostNodePorts)
    sh("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1", netns=topo.node)


def test_takeover_from_kube_proxy_iptables_mode(topo: Topology) -> None:
    ns = topo.node
    kube_proxy_node(topo)
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    assert flows.udp_answers() == {"udp-cluster-ip": "u", "udp-node-port": "u"}
    before, counts = save(ns)

    # the cluster now: c added to web, old deleted
    n = Node(topo)
    cluster(n, ("a", "b", "c"), old=False)
    preview = n.preview()
    assert save(ns) == (before, counts)  # the preview changed nothing
    result = n.sync(full=True)
    after, counts_after = save(ns)
    changed = sorted(c for c in set(before) | set(after) if before.get(c) != after.get(c))
    kinds = sorted(c.split("/")[1].split("-")[1] for c in changed)
    # web's service chain (a third endpoint), c's endpoint chain, KUBE-SERVICES
    # (old's rules), old's service and endpoint chains: nothing else
    assert kinds == ["SEP", "SEP", "SERVICES", "SVC", "SVC"], changed
    assert result.apply.changes == len(changed) == len(preview), (preview, changed)
    deleted = [c for c in changed if c not in after]
    assert len(deleted) == 2
    assert sorted(line for line in preview if " -X " in line) == sorted(
        f"iptables -t nat -X {c.split('/')[1]}" for c in deleted)
    # nothing flushed: the chains that did not change kept their packet counters
    for chain, c in counts.items():
        if chain not in changed:
            assert counts_after[chain] == c, chain

    flows.check()
    assert set(topo.answers("c1", "http", WEB_VIP, 80, 30)) == {"a", "b", "c"}

    # a restart of svcproxy (a fresh process knows nothing): nothing to change
    settled = save(ns)[0]
    again = Node(topo)
    cluster(again, ("a", "b", "c"), old=False)
    assert again.preview() == []
    assert again.sync(full=True).apply.changes == 0
    assert save(ns)[0] == settled


def test_plan_against_kernel_reads_the_live_cluster_and_changes_nothing(
        topo: Topology, tmp_path: Path) -> None:
    """`svcproxy plan --against-kernel --kubeconfig`: the cluster from the API
    server (tests/apiserver.py), the node from its kernel, as `run` would."""
    kube_proxy_node(topo)
    server = FakeAPIServer()
    try:
        for obj in (node("node-a", ips=[NODE_IP]),
                    service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB),
                    service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS),
                    slice_("web", ports=WEB_EP, endpoints=[endpoint(*PODS[p])
                                                           for p in ("a", "b", "c")]),
                    slice_("dns", ports=DNS_EP, endpoints=[endpoint(*PODS["u"])])):
            server.apply(obj)
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        config = tmp_path / "config.yaml"
        config.write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: iptables
            clusterCIDR: 10.244.0.0/16
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            datapaths: [iptables]
            datapathOptions:
              iptables: {{netns: {topo.node}, backend: nft}}
        """))
        svcproxy = str(Path(sys.executable).parent / "svcproxy")
        before = save(topo.node)
        common = ["--kubeconfig", str(kubeconfig), "--config", str(config), "--node", "node-a"]
        proc = subprocess.run([svcproxy, "plan", *common, "--against-kernel", "-o", "json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert save(topo.node) == before
        out = json.loads(proc.stdout)
        assert out["datapath"] == "iptables"
        changes = out["changes"]
        assert len(changes) == 5, changes
        assert sum(" -X KUBE-S" in c for c in changes) == 2  # old's chains
        assert any(c.startswith("iptables -t nat write KUBE-SERVICES") for c in changes)
        # the plain plan of the live cluster: its frontends, without a kernel
        proc = subprocess.run([svcproxy, "plan", *common, "-o", "json"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        fronts = {(f["address"], f["port"]) for f in json.loads(proc.stdout)}
        assert {(WEB_VIP, 80), (DNS_VIP, 53), (NODE_IP, 30080)} <= fronts
        # the table form says how many changes, one per line
        proc = subprocess.run([svcproxy, "plan", *common, "--against-kernel"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        first, *lines = proc.stdout.splitlines()
        assert first.startswith("# the first iptables sync on this node would make 5 change")
        assert sorted(lines) == sorted(changes)
    finally:
        server.close()


def test_sigkill_and_restart_of_the_process_is_invisible(topo: Topology,
                                                          tmp_path: Path) -> None:
    """The real process: `svcproxy run` SIGKILLed with connections open, then
    started again; the connections answer throughout, the new process finds
    nothing to change (its preview is empty), and nothing was flushed (every
    chain keeps its packet counters)."""
    import signal
    import time

    from svcproxy.status import ask_socket

    for name, (ip, _) in PODS.items():
        topo.add_pod(name, ip)
    manifests = tmp_path / "cluster"
    manifests.mkdir()
    objs = [node("node-a", ips=[NODE_IP]),
            service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB),
            service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS),
            slice_("web", ports=WEB_EP, endpoints=[endpoint(*PODS[p]) for p in ("a", "b")]),
            slice_("dns", ports=DNS_EP, endpoints=[endpoint(*PODS["u"])])]
    (manifests / "cluster.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                        "items": objs}))
    config = tmp_path / "config.yaml"
    config.write_text(config_text(
        {"mode": "iptables", "clusterCIDR": "10.244.0.0/16", "healthzBindAddress": "",
         "metricsBindAddress": ""},
        disable=["metrics", "conntrack"], datapaths=["iptables"],
        datapathOptions={"iptables": {"netns": topo.node, "backend": "nft"}}))
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    sock = tmp_path / "status.sock"
    run = [svcproxy, "run", "--manifests", str(manifests), "--config", str(config),
           "--node", "node-a", "--status-socket", str(sock)]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                text=True)
        topo.processes.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                if ask_socket(sock, "/svcproxy/status")["last_successful_sync"]:
                    return proc
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "no first sync"
            time.sleep(0.2)

    first = start()
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    before = save(topo.node)
    # nobody runs: the kernel serves what it holds
    assert flows.udp_answers() == {"udp-cluster-ip": "u", "udp-node-port": "u"}
    plan = subprocess.run([svcproxy, "plan", "--manifests", str(manifests), "--config",
                           str(config), "--node", "node-a", "--against-kernel", "-o", "json"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["changes"] == []
    second = start()  # the stale socket of the killed process is replaced
    rules, counters = save(topo.node)
    assert rules == before[0]  # not one rule rewritten
    for chain, counts in before[1].items():
        # no rule's packet counter reset to zero: nothing was flushed
        packets = [int(c.strip("[").split(":")[0]) for c in counts]
        now = [int(c.strip("[").split(":")[0]) for c in counters[chain]]
        assert all(n >= p for n, p in zip(now, packets, strict=True)), chain
    assert any(int(c.strip("[").split(":")[0]) for cs in before[1].values() for c in cs)
    flows.check()
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0
    assert not sock.exists()
