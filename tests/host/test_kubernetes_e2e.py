"""`svcproxy run --kubeconfig` against the test API server: the datapath is
programmed from API objects, follows changes, and the fallback is reported as
a Node event."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from apiserver import FakeAPIServer
from conftest import NODE_IP
from factories import endpoint, node, only_plugins, service, slice_
from netns import Topology

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def wait_answers(topo: Topology, host: str, port: int, want: set[str],
                 timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    answers: dict[str, int] = {}
    while time.monotonic() < deadline:
        answers = topo.answers("c1", "http", host, port, 20)
        if set(answers) == want:
            return answers
        time.sleep(0.3)
    raise AssertionError(f"wanted {want}, got {answers}")


def test_run_with_kubeconfig_programs_and_follows_the_api(topo: Topology,
                                                          server: FakeAPIServer,
                                                          tmp_path: Path) -> None:
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    server.apply(node("node-a", ips=[NODE_IP]))
    server.apply(service("web", cluster_ip="10.96.0.10", type="NodePort",
                         ports=[{**HTTP[0], "nodePort": 30080}]))
    server.apply(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")]))
    odd = service("odd", cluster_ip="10.96.0.11", ports=HTTP)
    odd["metadata"]["namespace"] = "team-a"
    odd["metadata"]["annotations"] = {"svcproxy.io/ipvs-scheduler": "fastest"}
    server.apply(odd)
    # MetalLB: one pool; the LoadBalancer IP of "lb" is outside it
    server.apply({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                  "metadata": {"name": "pool-a", "namespace": "metallb-system",
                               "resourceVersion": "1"},
                  "spec": {"addresses": ["198.51.100.0/24", "203.0.113.200-203.0.113.210"]}})
    server.apply(service("lb", cluster_ip="10.96.0.12", type="LoadBalancer",
                         ports=[{**HTTP[0], "nodePort": 30120}],
                         status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}))
    server.apply(slice_("lb", endpoints=[endpoint("10.244.1.11", "node-a")]))
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        iptables: {{minSyncPeriod: 0s}}
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        {only_plugins("nodeport", "loadbalancer", "metrics", "metallb")}
        enable:
          - name: metallb
            options: {{watchIPAddressPools: true}}
        datapathOptions:
          iptables: {{netns: {topo.node}}}
          nftables: {{netns: {topo.node}}}
    """))
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    proc = subprocess.Popen([svcproxy, "run", "--kubeconfig", str(kubeconfig), "--config",
                             str(config), "--node", "node-a",
                             "--status-socket", str(tmp_path / "status.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    topo.processes.append(proc)
    try:
        wait_answers(topo, "10.96.0.10", 80, {"a"})
        wait_answers(topo, NODE_IP, 30080, {"a"})
        server.apply(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                              endpoint("10.244.2.12", "node-b")]))
        wait_answers(topo, "10.96.0.10", 80, {"a", "b"})
        server.delete(service("web"))
        deadline = time.monotonic() + 30
        answers: dict[str, int] = {}
        while time.monotonic() < deadline:
            answers = topo.answers("c1", "http", "10.96.0.10", 80, 2)
            if all(a.startswith("!") for a in answers):
                break  # no rule claims the ClusterIP any more
            time.sleep(0.3)
        assert all(a.startswith("!") for a in answers), answers
        fallback = [e for e in server.posted_events if e["reason"] == "DatapathFallback"]
        assert len(fallback) == 1 and "ipvs datapath unusable" in fallback[0]["message"]
        assert fallback[0]["involvedObject"]["name"] == "node-a"
        # a bad scheduler annotation is reported on the Service itself, once
        bad = [e for e in server.posted_events if e["reason"] == "InvalidIPVSScheduler"]
        assert len(bad) == 1, bad
        assert bad[0]["involvedObject"] == {"kind": "Service", "namespace": "team-a",
                                            "name": "odd", "apiVersion": "v1"}
        assert bad[0]["metadata"]["namespace"] == "team-a"
        assert "unknown scheduler 'fastest'" in bad[0]["message"]
        # the LoadBalancer IP outside every MetalLB pool is reported on its Service
        outside = [e for e in server.posted_events
                   if e["reason"] == "LoadBalancerIPOutsidePools"]
        assert len(outside) == 1, outside
        assert outside[0]["involvedObject"]["name"] == "lb"
        assert "203.0.113.9 is outside every MetalLB IPAddressPool " \
               "(metallb-system/pool-a)" in outside[0]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    except AssertionError as exc:
        # what svcproxy logged is what explains a failure here
        if proc.poll() is None:
            proc.kill()
        log = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"{exc}\n--- svcproxy's log (last 60 lines) ---\n"
                             + "\n".join(log.splitlines()[-60:])) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert "waiting for the initial lists" in err and "Traceback" not in err
