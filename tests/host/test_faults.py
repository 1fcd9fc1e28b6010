"""Faults, end to end, with the real `svcproxy run` process and the iptables
datapath in a scratch namespace, traffic held through it all: the API server
gone for a while, the manifest directory swapped, half-written and moved
away, and the xtables lock held by another process past iptables' wait.

Each time the same four things are checked: the last good rules keep
serving (held flows and new connections answer as before), the failure is
counted in /metrics and logged once naming what it concerns, the retry backs
off, and the state converges once the fault clears. (The IPVS datapath's
faults — an ipset at maxelem, an IPVS message refused mid-batch — are
tests/vm/test_ipvs_faults.py.)"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

import yaml
from apiserver import FakeAPIServer
from conftest import NODE_IP
from factories import config_text, endpoint, node, service, slice_, wait_for
from netns import SvcProxyRun, Topology

WEB_VIP, DNS_VIP, NEW_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.20"
WEB = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
WEB_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
TCP_FLOWS = {"cluster-ip": (WEB_VIP, 80), "node-port": (NODE_IP, 30080)}
UDP_FLOWS = {"udp-cluster-ip": (DNS_VIP, 53)}
PODS = {"a": "10.244.1.11", "b": "10.244.2.12", "c": "10.244.3.13", "u": "10.244.1.53"}


def config(backend: str, topo: Topology) -> str:
    return config_text(
        {"mode": "iptables", "clusterCIDR": "10.244.0.0/16", "healthzBindAddress": "",
         "metricsBindAddress": "METRICS"},
        disable=["conntrack"], datapaths=["iptables"],
        datapathOptions={"iptables": {"netns": topo.node, "backend": backend}})


def web(*pods: str) -> list[dict]:  # type: ignore[type-arg]
    return [service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB),
            slice_("web", ports=WEB_EP, endpoints=[endpoint(PODS[p], "node-a") for p in pods])]


def dns() -> list[dict]:  # type: ignore[type-arg]
    return [service("dns", cluster_ip=DNS_VIP, ports=DNS),
            slice_("dns", ports=DNS_EP, endpoints=[endpoint(PODS["u"], "node-a")])]


def pods(topo: Topology) -> None:
    for name, ip in PODS.items():
        topo.add_pod(name, ip)


def web_answers(topo: Topology) -> set[str]:
    """Who answers 30 new connections to the web ClusterIP (refusals show as
    "!refused"). With two pods, eight connections all went to one of them
    once in 128 tries, and a test asking for both failed."""
    return set(topo.answers("c1", "http", WEB_VIP, 80, 30))


def lines(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def test_api_server_gone_for_a_while_and_back(topo: Topology, tmp_path: Path) -> None:
    """The control plane goes away (every connection closed, new ones refused)
    and the cluster changes meanwhile (pod b replaced by c). While it is gone
    the node keeps serving what it last knew; each failed request is counted
    (svcproxy_source_errors_total) with backoff between them, and logged once
    per resource; once it is back, svcproxy converges on what it missed.
    The outage is seconds here, not minutes: the backoff is capped at 1 s
    (--api-backoff-cap) instead of 30 s, so the same number of retries fit."""
    pods(topo)
    server = FakeAPIServer()
    try:
        server.apply(node("node-a", ips=[NODE_IP]))
        for obj in [*web("a", "b"), *dns()]:
            server.apply(obj)
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        run = SvcProxyRun(topo, tmp_path, ["--kubeconfig", str(kubeconfig), "--node",
                                           "node-a", "--api-backoff-cap", "1"],
                          config("nft", topo))
        run.start()
        flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
        assert web_answers(topo) == {"a", "b"}
        server.go_away()
        gone = time.monotonic()
        server.apply(web("a", "c")[1])  # the rollout goes on without this node seeing it
        time.sleep(4)
        # served as last known, by the rules in the kernel
        assert web_answers(topo) == {"a", "b"}
        assert flows.udp_answers() == {"udp-cluster-ip": "u"}
        assert run.proc is not None and run.proc.poll() is None
        outage = time.monotonic() - gone
        failed = {r: run.metric("svcproxy_source_errors_total", source="kubernetes",
                                resource=r) for r in ("services", "endpointslices", "nodes")}
        # retried (at least twice each), backing off (a busy loop would be thousands)
        assert all(2 <= n <= outage / 0.4 + 1 for n in failed.values()), failed
        server.come_back()
        back = time.monotonic()
        wait_for(lambda: web_answers(topo) == {"a", "c"}, 20, "converged on the rollout",
                 interval=0.2)
        took = time.monotonic() - back
        assert took < 5, took  # the next retry within the 1 s cap (and jitter)
        flows.check()
        # every reflector back (each retries on its own schedule)
        wait_for(lambda: len(lines(run.log(), "answers again")) == 3, 5, "all three back",
                 interval=0.2)
        assert run.stop() == 0
        log = run.log()
        # once per resource, however many retries
        assert len(lines(log, "cannot reach the API server")) == 3, log
        assert len(lines(log, "answers again")) == 3, log
        assert "Retrying" not in log  # no per-request retry chatter either
        assert "Traceback" not in log
    finally:
        server.close()


def test_manifest_directory_swapped_half_written_and_moved_away(topo: Topology,
                                                                tmp_path: Path) -> None:
    """The manifest source's faults, in the running process (polling every
    0.2 s): a ConfigMap volume's atomic `..data` swap is one change; a file
    caught half-written (its writer has written the Service, not yet the
    slice, and still has it open) is not used until it is complete; a file
    that turns invalid keeps its last good objects, logged once with file and
    line; a directory moved away keeps everything served. Then each converges."""
    pods(topo)
    d = tmp_path / "manifests"
    d.mkdir()

    def dump(path: Path, objs: list[dict]) -> None:  # type: ignore[type-arg]
        path.write_text(yaml.safe_dump_all(objs, sort_keys=False))

    def configmap_version(name: str, objs: list[dict]) -> None:  # type: ignore[type-arg]
        (d / name).mkdir()
        dump(d / name / "dns.yaml", objs)
        (d / "..data_tmp").symlink_to(name)
        (d / "..data_tmp").rename(d / "..data")  # what the kubelet does

    configmap_version("..v1", [node("node-a", ips=[NODE_IP]), *dns()])
    (d / "dns.yaml").symlink_to("..data/dns.yaml")
    dump(d / "web.yaml", web("a", "b"))
    run = SvcProxyRun(topo, tmp_path, ["--manifests", str(d), "--node", "node-a",
                                       "--poll-interval", "0.2"], config("nft", topo))
    run.start()
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)

    # 1. the ConfigMap volume swapped: a new Service appears, nothing else moves
    new = [service("new", cluster_ip=NEW_VIP, ports=WEB[:1]),
           slice_("new", ports=WEB_EP, endpoints=[endpoint(PODS["c"], "node-a")])]
    configmap_version("..v2", [node("node-a", ips=[NODE_IP]), *dns(), *new])
    wait_for(lambda: topo.answers("c1", "http", NEW_VIP, 80, 2) == {"c": 2}, 10, "the swap",
             interval=0.2)

    # 2. web.yaml rewritten in place, caught half-way with the writer still on it
    full = yaml.safe_dump_all(web("a", "c"), sort_keys=False)
    cut = full.index("---")
    with open(d / "web.yaml", "r+") as writer:
        writer.truncate(0)
        writer.write(full[:cut])
        writer.flush()
        time.sleep(1.5)  # many polls: the slice is not withdrawn meanwhile
        assert web_answers(topo) == {"a", "b"}
        writer.write(full[cut:])
    wait_for(lambda: web_answers(topo) == {"a", "c"}, 10, "the completed file", interval=0.2)

    # 3. the file turns invalid: its last good objects stay; fixed, it converges
    bad = full.replace("port: 80\n", "port: 99999\n", 1)
    assert bad != full
    (d / "web.yaml.tmp").write_text(bad)
    (d / "web.yaml.tmp").rename(d / "web.yaml")
    time.sleep(1.0)
    assert web_answers(topo) == {"a", "c"}
    errors = run.metric("svcproxy_source_errors_total", source="manifests")
    assert errors == 1

    # 4. the directory moved away (and back, fixed): everything keeps serving
    d.rename(tmp_path / "manifests.old")
    time.sleep(1.0)
    assert web_answers(topo) == {"a", "c"}
    assert topo.answers("c1", "http", NEW_VIP, 80, 2) == {"c": 2}
    (tmp_path / "manifests.old").rename(d)
    dump(d / "web.yaml", web("a", "b", "c"))
    wait_for(lambda: web_answers(topo) == {"a", "b", "c"}, 10, "the directory back",
             interval=0.2)
    assert run.metric("svcproxy_source_errors_total", source="manifests") == 2
    flows.check()
    assert run.stop() == 0
    log = run.log()
    invalid = lines(log, "must be between 1 and 65535")
    assert len(invalid) == 1 and f"{d / 'web.yaml'}:" in invalid[0], log
    assert len(lines(log, "the manifest directory is gone")) == 1, log
    assert "Traceback" not in log


def test_xtables_lock_held_past_the_wait(topo: Topology, tmp_path: Path) -> None:
    """Another program holds the xtables lock (iptables-legacy serialises on
    it) for longer than iptables-restore's 5 s wait: the sync fails, the rules
    in the kernel keep serving, the failure is counted and logged once, the
    retry backs off, and the change lands once the lock is free. The lock is
    the test's own file (XTABLES_LOCKFILE), not the machine's /run/xtables.lock."""
    pods(topo)
    lock = tmp_path / "xtables.lock"
    d = tmp_path / "manifests"
    d.mkdir()
    objs = [node("node-a", ips=[NODE_IP]), *web("a", "b"), *dns()]
    (d / "cluster.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                "items": objs}))
    run = SvcProxyRun(topo, tmp_path, ["--manifests", str(d), "--node", "node-a",
                                       "--poll-interval", "0.2"], config("legacy", topo),
                      env={"XTABLES_LOCKFILE": str(lock)})
    run.start()
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    errors_before = run.metric("svcproxy_syncs_total", outcome="error")
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        objs[2] = web("a", "c")[1]
        (d / "cluster.json.tmp").write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                        "items": objs}))
        (d / "cluster.json.tmp").rename(d / "cluster.json")
        wait_for(lambda: run.metric("svcproxy_syncs_total", outcome="error") > errors_before,
                 15, "a failed sync", interval=0.2)
        assert web_answers(topo) == {"a", "b"}  # the last good rules serve
        assert flows.udp_answers() == {"udp-cluster-ip": "u"}
        time.sleep(4)
        fcntl.flock(held, fcntl.LOCK_UN)
    wait_for(lambda: web_answers(topo) == {"a", "c"}, 20, "the change after the lock is free",
             interval=0.2)
    failures = run.metric("svcproxy_syncs_total", outcome="error") - errors_before
    assert 1 <= failures <= 2, failures  # each attempt waits 5 s; backoff between
    assert run.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == failures
    flows.check()
    assert run.stop() == 0
    log = run.log()
    # logged once, however many attempts: the error, then iptables' own words
    failed = lines(log, "sync with the iptables datapath failed")
    assert len(failed) == 1 and " ERROR " in failed[0], log
    assert "the previous rules stay in place" in failed[0]
    assert log.count("holding the xtables lock") == 1, log
    assert len(lines(log, "synced again after")) == 1, log
    assert "Traceback" not in log
