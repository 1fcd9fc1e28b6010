"""How the iptables datapath writes: only what changed, drift repaired, nothing
written without a change, exactly the rules `svcproxy plan` shows, and cleanup
that removes only svcproxy's own rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import NODE_IP, Node
from factories import endpoint, node, service, slice_
from netns import Topology, ipvs_available, sh

from svcproxy.bus import EventType
from svcproxy.plugins.iptables import datapath
from svcproxy.plugins.iptables.rules import chain_suffix, is_owned
from svcproxy.plugins.kernel.iptables import parse_save

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
ROOT = Path(__file__).parents[2]


def kernel_rules(topo: Topology, backend: str = "nft") -> dict[tuple[str, str], tuple[str, ...]]:
    out = {}
    for table in ("filter", "nat"):
        text = sh(f"iptables-{backend}-save", "-t", table, netns=topo.node).stdout
        for chain, rules in parse_save(text)[table].chains.items():
            out[(table, chain)] = rules
    return out


def populate(n: Node, count: int = 3) -> None:
    for i in range(count):
        n.publish(service(f"s{i}", cluster_ip=f"10.96.1.{i}", ports=HTTP))
        n.publish(slice_(f"s{i}", endpoints=[endpoint(f"10.244.1.{i}", "node-a"),
                                             endpoint(f"10.244.2.{i}", "node-b")]))


def test_endpoint_change_rewrites_only_that_services_chains(topo: Topology) -> None:
    n = Node(topo)
    populate(n)
    n.sync()
    before = kernel_rules(topo)
    n.publish(slice_("s1", endpoints=[endpoint("10.244.1.1", "node-a"),
                                      endpoint("10.244.3.1", "node-c")]), EventType.MODIFIED)
    result = n.sync()
    assert not result.full
    after = kernel_rules(topo)
    changed = {c for c in set(before) | set(after) if before.get(c) != after.get(c)}
    svc = "KUBE-SVC-" + chain_suffix("default/s1:http", "tcp")
    assert ("nat", svc) in changed
    others = {c for _, c in changed if c != svc}
    assert len(others) == 2 and all(c.startswith("KUBE-SEP-") for c in others), changed
    written = result.apply.details["ipv4"]["written"]
    assert sorted(written) == sorted(f"nat/{c}" for c in [svc, *others]
                                     if ("nat", c) in after)
    assert result.apply.details["ipv4"]["deleted"] == [
        f"nat/{c}" for c in sorted(others) if ("nat", c) not in after]


def test_no_change_writes_nothing(topo: Topology) -> None:
    n = Node(topo)
    populate(n)
    n.sync()
    restores = n.restores()
    n.publish(service("s0", cluster_ip="10.96.1.0", ports=HTTP), EventType.MODIFIED)
    n.sync()
    n.sync(full=True)
    n.sync(full=True)
    assert n.restores() == restores


def test_full_sync_repairs_rules_changed_behind_our_back(topo: Topology) -> None:
    n = Node(topo)
    populate(n)
    n.sync()
    want = kernel_rules(topo)
    svc = "KUBE-SVC-" + chain_suffix("default/s2:http", "tcp")
    sh("iptables-nft", "-t", "nat", "-D", svc, "1", netns=topo.node)
    sh("iptables-nft", "-t", "nat", "-D", "PREROUTING", "1", netns=topo.node)
    sh("iptables-nft", "-t", "nat", "-N", "KUBE-SVC-STALESTALESTALE", netns=topo.node)
    assert kernel_rules(topo) != want
    n.sync()  # a partial sync trusts its memory: nothing to do
    result = n.sync(full=True)
    assert kernel_rules(topo) == want
    assert result.apply.details["ipv4"]["written"] == [f"nat/{svc}"]
    assert result.apply.details["ipv4"]["deleted"] == ["nat/KUBE-SVC-STALESTALESTALE"]


@pytest.mark.parametrize("chunk", [None, 2])
def test_kernel_holds_exactly_what_plan_prints(topo: Topology, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               chunk: int | None) -> None:
    """Also with the full sync's input built two service ports at a time (five
    chunks and the shared chains, one restore)."""
    if chunk is not None:
        monkeypatch.setattr(datapath, "CHUNK", chunk)
    n = Node(topo)
    populate(n, 7)
    n.publish(service("lb", cluster_ip="10.96.2.1", type="LoadBalancer",
                      ports=[{**HTTP[0], "nodePort": 30100}], externalTrafficPolicy="Local",
                      healthCheckNodePort=32000, sessionAffinity="ClientIP",
                      loadBalancerSourceRanges=["192.168.100.0/24"],
                      status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}))
    n.publish(slice_("lb", endpoints=[endpoint("10.244.1.50", "node-a"),
                                      endpoint("10.244.2.50", "node-b")]))
    n.publish(service("none", cluster_ip="10.96.2.2", ports=HTTP, externalIPs=["203.0.113.20"]))
    n.sync()
    rendered = n.host.render("iptables", n.proxy.applied, "iptables-save")
    assert rendered is not None
    text = rendered.split("# ip6tables-save")[0]
    planned = {(t, c): r for t, tab in parse_save(text).items() for c, r in tab.chains.items()}
    kernel = kernel_rules(topo)
    ours = {k: v for k, v in kernel.items() if is_owned(*k)}
    assert ours == {k: v for k, v in planned.items() if is_owned(*k)}
    for table, chain in (("filter", "INPUT"), ("nat", "PREROUTING")):
        for rule in planned[(table, chain)]:
            assert rule in kernel[(table, chain)]
    assert n.restores() == 1
    n.sync(full=True)
    assert n.restores() == 1


def test_legacy_backend(topo: Topology) -> None:
    n = Node(topo, backend="legacy")
    topo.add_pod("a", "10.244.1.11")
    n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    n.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")]))
    n.sync()
    assert topo.answers("c1", "http", "10.96.0.10", 80, 3) == {"a": 3}
    assert any(c.startswith("KUBE-SVC-") for _, c in kernel_rules(topo, "legacy"))
    assert not any(c.startswith("KUBE-SVC-") for _, c in kernel_rules(topo, "nft"))


def test_cleanup_removes_only_svcproxys_rules(topo: Topology) -> None:
    n = Node(topo)
    populate(n)
    n.sync()
    sh("iptables-nft", "-t", "filter", "-N", "OTHER-FW", netns=topo.node)
    sh("iptables-nft", "-t", "filter", "-A", "OTHER-FW", "-j", "ACCEPT", netns=topo.node)
    sh("iptables-nft", "-t", "filter", "-A", "FORWARD", "-j", "OTHER-FW", netns=topo.node)
    sh("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.0.0.0/8", "-j", "MASQUERADE",
       netns=topo.node)
    # (the conntrack plugin changed the node namespace's sysctls without a
    # backup file, as for any throwaway namespace: whatever this machine's own
    # values, cleanup reports only the rules)
    lines = n.host.cleanup()
    # 12 jumps, and INPUT/OUTPUT -> KUBE-FIREWALL (localhostNodePorts)
    assert any("iptables: removed 14 jump rules" in line for line in lines), lines
    assert not any(line.startswith("sysctl") for line in lines), lines
    left = kernel_rules(topo)
    assert not any(is_owned(*k) for k in left) and ("filter", "KUBE-FIREWALL") not in left
    assert left[("filter", "OTHER-FW")] == ("-A OTHER-FW -j ACCEPT",)
    assert left[("filter", "FORWARD")] == ("-A FORWARD -j OTHER-FW",)
    assert left[("nat", "POSTROUTING")] == ("-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE",)


@pytest.mark.parametrize("fallback", ["nftables", "iptables"])
def test_cli_falls_back_from_ipvs_and_serves_traffic(topo: Topology, tmp_path: Path,
                                                     fallback: str) -> None:
    """`mode: ipvs` on this kernel (no IPVS): the probe fails, one log line says
    why, and the next datapath of the order programs the example-style
    manifests: nftables by default, iptables when the order says so."""
    if ipvs_available():
        pytest.skip("this kernel has IPVS; the fallback is tested in the VM tier, with the "
                    "IPVS modules unloaded (tests/vm/test_zfallback_without_ipvs.py)")
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    import yaml
    docs = [node("node-a", ips=[NODE_IP]),
            service("web", cluster_ip="10.96.0.10", type="NodePort",
                    ports=[{**HTTP[0], "nodePort": 30080}]),
            slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                     endpoint("10.244.2.12", "node-b")])]
    (manifests / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    config = tmp_path / "config.yaml"
    # (the netns options make the plugins that change sysctls work on the node
    # namespace without recording them in this machine's /var/lib/svcproxy)
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapathOptions:
          ipvs: {{netns: {topo.node}}}
          iptables: {{netns: {topo.node}}}
          nftables: {{netns: {topo.node}}}
    """) + ("datapaths: [ipvs, iptables]\n" if fallback == "iptables" else ""))
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    status = tmp_path / "status.json"
    proc = subprocess.run(["ip", "netns", "exec", topo.node, svcproxy, "run", "--once",
                           "--manifests", str(manifests), "--config", str(config),
                           "--status-file", str(status)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(lines := [ln for ln in proc.stderr.splitlines() if "datapath unusable" in ln]) == 1
    assert "ipvs datapath unusable: " in lines[0]
    assert lines[0].endswith(f"; using {fallback}")
    assert "ip_vs" in lines[0]
    import json
    recorded = json.loads(status.read_text())
    assert recorded["datapath"] == fallback and recorded["node"] == "node-a"
    assert recorded["fallbacks"][0]["datapath"] == "ipvs"
    assert "ip_vs" in recorded["fallbacks"][0]["reason"]
    assert recorded["last_sync"]["ok"] and recorded["last_sync"]["frontends"] == 2
    answers = topo.answers("c1", "http", NODE_IP, 30080, 30)
    assert set(answers) == {"a", "b"}
    proc = subprocess.run(["ip", "netns", "exec", topo.node, svcproxy, "cleanup",
                           "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not any(is_owned(*k) for k in kernel_rules(topo))
    assert "kube-proxy" not in sh("nft", "list", "tables", netns=topo.node).stdout


@pytest.mark.parametrize("weights", [(1, 3)])
def test_weights_shape_the_spread(topo: Topology, weights: tuple[int, int]) -> None:
    """Backend weights from plugins become statistic probabilities; weight 0
    takes no new connections."""
    from dataclasses import replace

    from svcproxy import hookimpl

    class Weights:
        @hookimpl
        def svcproxy_adjust_frontend(self, frontend):  # type: ignore[no-untyped-def]
            w = {"10.244.1.11": weights[0], "10.244.2.12": weights[1], "10.244.3.13": 0}
            return replace(frontend, backends=tuple(replace(b, weight=w[b.address])
                                                    for b in frontend.backends))

    n = Node(topo)
    n.host.pm.register(Weights(), name="weights")
    for name, ip in (("a", "10.244.1.11"), ("b", "10.244.2.12"), ("c", "10.244.3.13")):
        topo.add_pod(name, ip)
    n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    n.publish(slice_("web", endpoints=[endpoint("10.244.1.11"), endpoint("10.244.2.12"),
                                       endpoint("10.244.3.13")]))
    n.sync()
    # 1:3 means a ~ 50 of 200 (sd ~6); equal weights would give a ~ 100. The
    # bound fails for 1:3 with a probability of ~2e-4 (80 requests and b > 2a
    # failed ~5 % of runs)
    answers = topo.answers("c1", "http", "10.96.0.10", 80, 200)
    assert "c" not in answers
    assert answers.get("b", 0) > 1.8 * answers.get("a", 0), answers


def test_backend_detection(topo: Topology) -> None:
    from svcproxy.plugins.kernel.iptables import detect_backend

    backend, why = detect_backend(4, topo.node)
    assert backend == "nft" and "no rules yet" in why
    # looking must not create legacy tables (iptables-nft would warn about them forever)
    assert sh("cat", "/proc/net/ip_tables_names", netns=topo.node).stdout.strip() == ""
    sh("iptables-legacy", "-t", "filter", "-A", "FORWARD", "-j", "ACCEPT", netns=topo.node)
    assert detect_backend(4, topo.node)[0] == "legacy"
    sh("iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT", netns=topo.node)
    backend, why = detect_backend(4, topo.node)
    assert backend == "nft" and "KUBE-IPTABLES-HINT" in why
