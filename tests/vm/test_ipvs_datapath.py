"""The IPVS datapath end to end inside the VM: real traffic from client
namespaces through the node namespace's IPVS table to pod namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

from factories import ProxyHarness, endpoint, run_cli, service, slice_
from netns import Topology, ipset_save, sh, unprivileged

from svcproxy import hookimpl
from svcproxy.bus import EventType
from svcproxy.ir import Frontend

ROOT = Path(__file__).resolve().parents[2]
HOST = ROOT / "tests" / "host"
NODE_IP = "192.168.100.1"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}]


class IpvsNode(ProxyHarness):
    def __init__(self, topo: Topology, tmp: Path, scheduler: str = "rr",
                 drain_timeout: float = 0, ignores_inactive: bool = False,
                 extra_plugins: list | None = None) -> None:  # type: ignore[type-arg]
        text = textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: ipvs
            ipvs: {{scheduler: {scheduler}}}
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            datapaths: [ipvs]
            datapathOptions:
              ipvs: {{netns: {topo.node}, drainTimeout: {drain_timeout},
                     drainIgnoresInactive: {str(ignores_inactive).lower()},
                     sysctlBackup: {tmp / 'sysctl.json'}}}
        """)
        super().__init__(text, "ipvs", [NODE_IP], extra_plugins=extra_plugins)
        name, skipped = self.host.select_datapath()
        assert name == "ipvs", skipped


def ipvsadm(topo: Topology) -> list[str]:
    out = sh("ipvsadm", "-S", "-n", netns=topo.node).stdout
    return sorted(line for line in out.splitlines() if line)


def test_cluster_ip_and_node_port_traffic(topo: Topology, tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path)
    eps = []
    for name, ip, where in (("a", "10.244.1.11", "node-a"), ("b", "10.244.2.12", "node-b"),
                            ("c", "10.244.3.13", "node-c")):
        topo.add_pod(name, ip)
        eps.append(endpoint(ip, where))
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30080}]))
    n.publish(slice_("web", endpoints=eps))
    n.sync()
    for host, port in (("10.96.0.10", 80), (NODE_IP, 30080)):
        answers = topo.answers("c1", "http", host, port, 9)
        assert answers == {"a": 3, "b": 3, "c": 3}, (host, answers)  # rr: exact
    # the kernel holds exactly what `svcproxy plan --output ipvsadm` shows
    rendered = n.host.render("ipvs", n.proxy.applied, "ipvsadm")
    assert ipvsadm(topo) == sorted(rendered.splitlines())
    addrs = sh("ip", "-j", "addr", "show", "kube-ipvs0", netns=topo.node).stdout
    assert "10.96.0.10" in addrs and NODE_IP not in addrs


def test_established_connection_survives_endpoint_removal(topo: Topology,
                                                          tmp_path: Path) -> None:
    """Drain on the real kernel, with the connection held well past the 30 s
    svcproxy used to cut draining real servers at: the real server stays at
    weight 0 while the connection is open (active) and after it closed
    (inactive, TIME_WAIT), as with kube-proxy; with drainIgnoresInactive the
    closed connection no longer holds it and the next sync deletes it."""
    n = IpvsNode(topo, tmp_path, ignores_inactive=True)
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    eps = [endpoint("10.244.1.11", "node-a"), endpoint("10.244.2.12", "node-b")]
    n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    n.publish(slice_("web", endpoints=eps))
    n.sync()
    hold = topo.hold("c1", "10.96.0.10", 80)
    first = hold.first
    gone = topo.pods[first].ip
    n.publish(slice_("web", endpoints=[e for e in eps if e["addresses"][0] != gone]),
              EventType.MODIFIED)
    result = n.sync()
    assert result.apply.details["draining"] == 1
    assert f"-r {gone}:8080 -m -w 0" in " ".join(ipvsadm(topo))
    other = "b" if first == "a" else "a"
    assert topo.answers("c1", "http", "10.96.0.10", 80, 10) == {other: 10}
    # still draining while the connection is open (no time limit: that an hour
    # does not end it is test_ipvs_proxier.py's, on a fake clock)
    time.sleep(3)
    n.sync()
    assert f"-r {gone}:8080 -m -w 0" in " ".join(ipvsadm(topo))
    final = hold.again()
    assert final == {"first": first, "second": first}  # same connection, same pod
    # the connection is closed: the next sync deletes the drained real server
    subprocess.run(["sleep", "1"], check=True)
    n.sync()
    assert gone not in " ".join(ipvsadm(topo))


def test_udp_endpoint_removal_takes_effect_at_once(topo: Topology, tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path)
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    eps = [endpoint("10.244.1.11", "node-a"), endpoint("10.244.2.12", "node-b")]
    n.publish(service("dns", cluster_ip="10.96.0.53", ports=DNS))
    n.publish(slice_("dns", endpoints=eps, ports=SLICE_PORTS))
    n.sync()
    session = topo.hold_udp("c1", "10.96.0.53", 53)
    first = session.ask()
    assert session.ask() == first
    gone = topo.pods[first].ip
    n.publish(slice_("dns", endpoints=[e for e in eps if e["addresses"][0] != gone],
                     ports=SLICE_PORTS), EventType.MODIFIED)
    n.sync()
    assert gone not in " ".join(ipvsadm(topo))  # UDP: deleted, not drained
    assert session.ask() == ("b" if first == "a" else "a")
    session.close()


def test_full_sync_repairs_drift_and_partial_touches_only_changes(topo: Topology,
                                                                  tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path)
    for i in range(3):
        n.publish(service(f"s{i}", cluster_ip=f"10.96.1.{i}", ports=HTTP))
        n.publish(slice_(f"s{i}", endpoints=[endpoint(f"10.244.1.{i + 1}")]))
    n.publish(service("v6", cluster_ip="fd00:96::10", ipFamilies=["IPv6"], ports=DNS))
    n.publish(slice_("v6", endpoints=[endpoint("fd00:244::11"), endpoint("fd00:244::12")],
                     address_type="IPv6", ports=[SLICE_PORTS[1]]))
    n.sync()
    want = ipvsadm(topo)
    sh("ipvsadm", "-D", "-t", "10.96.1.1:80", netns=topo.node)
    sh("ipvsadm", "-d", "-t", "10.96.1.0:80", "-r", "10.244.1.1:8080", netns=topo.node)
    sh("ipvsadm", "-d", "-u", "[fd00:96::10]:53", "-r", "[fd00:244::12]:5353",
       netns=topo.node)
    # a virtual server that is not svcproxy's (keepalived's, say): not on
    # kube-ipvs0, not a NodePort; and a stale NodePort-shaped one, which is
    sh("ipvsadm", "-A", "-t", "10.99.0.1:80", "-s", "wlc", netns=topo.node)
    sh("ipvsadm", "-a", "-t", "10.99.0.1:80", "-r", "10.99.0.2:80", "-m", "-w", "3",
       netns=topo.node)
    sh("ipvsadm", "-A", "-t", f"{NODE_IP}:30999", "-s", "rr", netns=topo.node)
    foreign = ["-A -t 10.99.0.1:80 -s wlc", "-a -t 10.99.0.1:80 -r 10.99.0.2:80 -m -w 3"]
    n.sync()  # partial: nothing changed in the cluster, nothing touched
    assert "-A -t 10.96.1.1:80 -s rr" not in ipvsadm(topo)
    n.sync(full=True)  # repairs virtual and real servers, both families
    assert ipvsadm(topo) == sorted(want + foreign)
    n.sync(full=True)
    assert ipvsadm(topo) == sorted(want + foreign)
    lines = n.host.cleanup()
    assert ipvsadm(topo) == sorted(foreign)
    assert any("kept 1 virtual servers that are not svcproxy's" in line for line in lines)


def test_real_servers_of_many_virtual_servers_read_together(topo: Topology,
                                                            tmp_path: Path) -> None:
    """Full syncs send the per-service dump requests many at a time
    (dests_of): small dumps finish within their request; a large one (here 60
    real servers, several messages) is still running when the next request
    arrives, which the kernel refuses (EBUSY) and svcproxy asks again. Either
    way the answer equals one dump per virtual server."""
    n = IpvsNode(topo, tmp_path)
    for i in range(40):
        n.publish(service(f"s{i}", cluster_ip=f"10.96.2.{i}", ports=HTTP))
        count = 60 if i in (5, 6) else 1 + i % 4
        n.publish(slice_(f"s{i}", endpoints=[endpoint(f"10.245.{i}.{j + 1}")
                                             for j in range(count)]))
    n.publish(service("v6", cluster_ip="fd00:96::20", ipFamilies=["IPv6"], ports=HTTP))
    n.publish(slice_("v6", endpoints=[endpoint("fd00:245::1")], address_type="IPv6"))
    n.sync()
    nl = n.plugin.state.kernel.nl
    services = nl.services()
    one_by_one = {vs.key: sorted(nl.dests(vs)) for vs in services}
    for per_send in (64, 7):
        nl.DUMPS_PER_SEND = per_send
        together = nl.dests_of(services)
        assert {k: sorted(v) for k, v in together.items()} == one_by_one
    assert len(one_by_one[("10.96.2.5", 80, "TCP")]) == 60 and len(one_by_one) == 41


def test_cleanup_restores_sysctls(topo: Topology, tmp_path: Path) -> None:
    sh("sysctl", "-qw", "net.ipv4.vs.expire_nodest_conn=0", netns=topo.node)
    n = IpvsNode(topo, tmp_path)
    n.publish(service("s", cluster_ip="10.96.1.1", ports=HTTP))
    n.sync()
    read = sh("sysctl", "-n", "net.ipv4.vs.expire_nodest_conn", netns=topo.node).stdout
    assert read.strip() == "1"
    lines = n.host.cleanup()
    assert "ipvs: removed kube-ipvs0" in lines
    assert any("expire_nodest_conn restored to 0" in line for line in lines)
    read = sh("sysctl", "-n", "net.ipv4.vs.expire_nodest_conn", netns=topo.node).stdout
    assert read.strip() == "0"
    assert ipvsadm(topo) == []


def test_helper_sets_and_rules_source_ranges_and_masquerade(topo: Topology,
                                                            tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path)
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("r", "10.244.2.12")
    n.publish(service("lb", cluster_ip="10.96.0.50", type="LoadBalancer",
                      ports=[{**HTTP[0], "nodePort": 30100}],
                      loadBalancerSourceRanges=["192.168.100.0/24", "192.0.2.7/32"],
                      status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}))
    n.publish(slice_("lb", endpoints=[endpoint("10.244.1.11", "node-a")]))
    n.publish(service("remote", cluster_ip="10.96.0.60", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30200}]))
    n.publish(slice_("remote", endpoints=[endpoint("10.244.2.12", "node-b")]))
    n.sync()
    sets = sh("ipset", "save", netns=topo.node).stdout
    for entry in ("add KUBE-CLUSTER-IP 10.96.0.50,tcp:80", "add KUBE-LOAD-BALANCER "
                  "203.0.113.10,tcp:80", "add KUBE-LOAD-BALANCER-FW 203.0.113.10,tcp:80",
                  "add KUBE-LOAD-BALANCER-SOURCE-CIDR 203.0.113.10,tcp:80,192.168.100.0/24",
                  "add KUBE-NODE-PORT-TCP 30100", "add KUBE-IPVS-IPS 10.96.0.50"):
        assert entry in sets, entry
    # source ranges: c1 is inside, c2 is not (and the range guards the LB IP only)
    assert topo.answers("c1", "http", "203.0.113.10", 80, 3) == {"a": 3}
    assert topo.answers("c2", "http", "203.0.113.10", 80, 1) == {"!timeout": 1}
    assert topo.answers("c2", "http", NODE_IP, 30100, 2) == {"a": 2}
    # NodePort traffic from outside is masqueraded: the pod sees the node's
    # address on its link (169.254.1.1), not the client's 192.168.100.2
    assert topo.client("c1", "whoami", NODE_IP, "30200", "2")["answers"] == {"169.254.1.1": 2}
    # the VIP does not expose other ports of the node
    assert topo.answers("c1", "http", "10.96.0.60", 22, 1) == {"!refused": 1}
    # nothing changed: a full sync writes nothing, and a single-address range
    # stays (ipset save prints it without /32; full syncs once deleted it)
    before = n.plugin.helpers[4].ipt.restores
    n.sync(full=True)
    assert "add KUBE-LOAD-BALANCER-SOURCE-CIDR 203.0.113.10,tcp:80,192.0.2.7\n" in \
        sh("ipset", "save", netns=topo.node).stdout
    assert n.plugin.helpers[4].ipt.restores == before
    lines = n.host.cleanup()
    assert any("ipsets" in line for line in lines), lines
    assert "KUBE-CLUSTER-IP" not in sh("ipset", "save", netns=topo.node).stdout
    assert "KUBE-" not in sh("iptables-save", netns=topo.node).stdout


def kernel_sets(topo: Topology) -> dict[str, set[str]]:
    return ipset_save(topo.node)


def test_helper_sets_stay_right_through_partial_syncs(topo: Topology, tmp_path: Path) -> None:
    """Regression: every endpoint change used to empty KUBE-CLUSTER-IP,
    KUBE-IPVS-IPS and KUBE-LOOP-BACK until the next full sync, and the
    KUBE-IPVS-FILTER REJECT rule then refused new connections to a VIP's other
    ports. After each partial sync every helper set equals a from-scratch
    rendering of the plan, and both ports of the Service answer."""
    from svcproxy.plugins.ipvs.helpers import SETS, set_entries

    n = IpvsNode(topo, tmp_path)
    for name, ip in (("a", "10.244.1.11"), ("b", "10.244.1.12"), ("c", "10.244.2.13")):
        topo.add_pod(name, ip)
    ports = [HTTP[0], {**HTTP[0], "name": "alt", "port": 81}]
    slice_ports = [{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "alt", "port": 8080, "protocol": "TCP"}]
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort",
                      ports=[{**ports[0], "nodePort": 30080}, {**ports[1], "nodePort": 30081}]))
    steps = [["10.244.1.11", "10.244.1.12", "10.244.2.13"], ["10.244.1.11", "10.244.2.13"],
             ["10.244.1.11", "10.244.1.12"], ["10.244.2.13"]]
    where = {"10.244.1.11": "node-a", "10.244.1.12": "node-a", "10.244.2.13": "node-b"}
    for i, ips in enumerate(steps):
        n.publish(slice_("web", endpoints=[endpoint(ip, where[ip]) for ip in ips],
                         ports=slice_ports), EventType.MODIFIED if i else EventType.ADDED)
        result = n.sync()
        assert result.full == (i == 0)
        plan = n.proxy.applied
        bound = {fe.address for fe in plan.frontends.values() if fe.bind_address}
        want, _ = set_entries(plan, bound, 4, NODE_IP)
        have = kernel_sets(topo)
        for name in SETS:
            assert have.get(name) == want[name], (ips, name)
        if i == 1:  # the step that used to empty the sets: both ports still answer
            for port in (80, 81):
                answers = topo.answers("c1", "http", "10.96.0.10", port, 6)
                assert set(answers) == {"a", "c"}, (ips, port, answers)


class Weights:
    """A plugin that weighs backends by their pod (wrr needs weights: Kubernetes
    has none, plugins set them)."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = weights

    @hookimpl
    def svcproxy_adjust_frontend(self, frontend: Frontend) -> Frontend | None:
        return replace(frontend, backends=tuple(
            replace(b, weight=self.weights.get(b.address, b.weight))
            for b in frontend.backends))


def test_schedulers_and_affinity_spread_traffic(topo: Topology, tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path, extra_plugins=[("weights", Weights({"10.244.1.11": 3}))])
    topo.add_client("c3", "192.168.100.3", NODE_IP)
    eps = []
    for name, ip in (("a", "10.244.1.11"), ("b", "10.244.2.12")):
        topo.add_pod(name, ip)
        eps.append(endpoint(ip, "node-b"))
    for name, vip, extra in (
            ("wrr", "10.96.0.21", {"annotations": {"svcproxy.io/ipvs-scheduler": "wrr"}}),
            ("sh", "10.96.0.22", {"annotations": {"svcproxy.io/ipvs-scheduler": "sh"}}),
            ("aff", "10.96.0.23", {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {
                "clientIP": {"timeoutSeconds": 3}}})):
        n.publish(service(name, cluster_ip=vip, ports=HTTP, **extra))
        n.publish(slice_(name, endpoints=eps))
    n.sync()
    table = " ".join(ipvsadm(topo))
    assert "-A -t 10.96.0.21:80 -s wrr" in table and "-A -t 10.96.0.22:80 -s sh" in table
    assert "-A -t 10.96.0.23:80 -s rr -p 3" in table
    # wrr follows the weights: 3 to a for each 1 to b
    assert topo.answers("c1", "http", "10.96.0.21", 80, 8) == {"a": 6, "b": 2}
    # sh: each client address always lands on one backend
    for client in ("c1", "c2", "c3"):
        assert len(topo.answers(client, "http", "10.96.0.22", 80, 4)) == 1, client
    # ClientIP affinity: one backend per client until the timeout, then rr again
    first = topo.answers("c1", "http", "10.96.0.23", 80, 4)
    assert len(first) == 1
    deadline = time.monotonic() + 60
    later = first
    while later == first and time.monotonic() < deadline:
        time.sleep(4)  # the persistence template expires 3 s after its last connection
        later = topo.answers("c1", "http", "10.96.0.23", 80, 1)
    assert later != first, "affinity never expired"


def test_sctp_and_ipv6(topo: Topology, tmp_path: Path) -> None:
    n = IpvsNode(topo, tmp_path)
    topo.add_client("c6", "192.168.101.2", "192.168.101.1", ip6="fd00:100::2",
                    node_ip6="fd00:100::1")
    sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", netns=topo.node)
    topo.add_pod("a", "10.244.1.11", ip6="fd00:244::11")
    topo.add_pod("b", "10.244.2.12", ip6="fd00:244::12")
    sctp = [{"name": "sctp", "port": 90, "protocol": "SCTP", "targetPort": 9090}]
    n.publish(service("sc", cluster_ip="10.96.0.90", ports=sctp))
    n.publish(slice_("sc", endpoints=[endpoint("10.244.1.11"), endpoint("10.244.2.12")],
                     ports=[{"name": "sctp", "port": 9090, "protocol": "SCTP"}]))
    n.publish(service("v6", cluster_ip="fd00:96::10", ipFamilies=["IPv6"], ports=HTTP))
    n.publish(slice_("v6", endpoints=[endpoint("fd00:244::11"), endpoint("fd00:244::12")],
                     address_type="IPv6"))
    n.sync()
    table = ipvsadm(topo)
    assert "-A --sctp-service 10.96.0.90:90 -s rr" in table
    assert "-A -t [fd00:96::10]:80 -s rr" in table
    assert topo.answers("c1", "sctp", "10.96.0.90", 90, 10) == {"a": 5, "b": 5}
    assert topo.answers("c6", "http", "fd00:96::10", 80, 10) == {"a": 5, "b": 5}
    sets = sh("ipset", "save", netns=topo.node).stdout
    assert "add KUBE-6-CLUSTER-IP fd00:96::10,tcp:80" in sets
    assert "add KUBE-CLUSTER-IP 10.96.0.90,sctp:90" in sets


def test_vip_sourced_node_traffic_is_masqueraded_before_the_first_sync(
        topo: Topology, tmp_path: Path) -> None:
    """A restart (or a takeover from kube-proxy): kube-ipvs0 already holds a VIP
    and IPVS its virtual server. svcproxy's first act masquerades node traffic
    whose source is that VIP, before any sync."""
    topo.add_pod("a", "10.244.1.11")
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy", netns=topo.node)
    sh("ip", "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0", netns=topo.node)
    sh("ipvsadm", "-A", "-t", "10.96.0.1:80", "-s", "rr", netns=topo.node)
    sh("ipvsadm", "-a", "-t", "10.96.0.1:80", "-r", "10.244.1.11:8080", "-m", netns=topo.node)
    sh("sysctl", "-qw", "net.ipv4.vs.conntrack=1", netns=topo.node)

    topo.clients["node"] = topo.node  # the node itself as a client (in-process)

    def seen_by_pod() -> str:
        return next(iter(topo.answers("node", "whoami", "10.96.0.1", 80, 1)))

    assert seen_by_pod() == "10.96.0.1"  # the node's own connection comes from the VIP
    n = IpvsNode(topo, tmp_path)
    n.plugin._early_masquerade(n.proxy.applied)
    assert seen_by_pod() == "169.254.1.1"  # masqueraded to the node's address
    assert "add KUBE-IPVS-IPS 10.96.0.1" in sh("ipset", "save", netns=topo.node).stdout


def test_run_once_programs_what_plan_prints(tmp_path: Path) -> None:
    """`svcproxy run --once` on the example cluster, as the DaemonSet runs it:
    after `svcproxy prepare` (privileged), with only the capabilities
    deploy/daemonset.yaml grants and a read-only /proc/sys. The kernel then
    holds what `svcproxy plan --output ipvsadm` prints, and nothing warned."""
    topo = Topology()
    try:
        topo.create_node()
        # the node's addresses as its Node object lists them (NodePorts bind there)
        sh("ip", "addr", "add", "192.168.50.11/32", "dev", "lo", netns=topo.node)
        sh("ip", "-6", "addr", "add", "fd00:192:168:50::11/128", "dev", "lo", "nodad",
           netns=topo.node)
        run_once_and_compare(topo, tmp_path)
    finally:
        topo.close()


def run_once_and_compare(topo: Topology, tmp_path: Path) -> None:
    # svcproxy runs inside the node's namespace, as on a node; conntrack is
    # off because nf_conntrack_max is writable only in the initial namespace
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        healthzBindAddress: ""
        metricsBindAddress: ""
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        disable: [conntrack]
        datapathOptions:
          ipvs: {{sysctlBackup: {tmp_path / 'sysctl.json'}}}
    """))
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    prepared = subprocess.run(["ip", "netns", "exec", topo.node, svcproxy, "prepare",
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.splitlines()[-1] == "node prepared for the ipvs datapath"
    assert "sysctl net.ipv4.vs.conntrack=1" in prepared.stdout
    args = ["--manifests", str(ROOT / "examples" / "cluster"), "--config", str(config),
            "--node", "node-a"]
    run = unprivileged(topo.node, "run", "--once", "--status-socket", "", *args)
    assert run.returncode == 0, run.stderr
    assert "fall" not in run.stderr.lower(), run.stderr  # IPVS, no fallback
    assert " WARNING " not in run.stderr and "Traceback" not in run.stderr, run.stderr
    code, printed = run_cli("plan", "--output", "ipvsadm", *args)
    assert code == 0, printed
    assert ipvsadm(topo) == sorted(line for line in printed.splitlines() if line)


def parse_ipvsadm_stats(text: str) -> dict[tuple[str, ...], list[int]]:
    """`ipvsadm -L -n --stats --exact`: (proto, vip:port[, backend]) -> counters."""
    out: dict[tuple[str, ...], list[int]] = {}
    vs: tuple[str, str] | None = None
    for line in text.splitlines():
        f = line.split()
        if len(f) == 7 and f[0] in ("TCP", "UDP", "SCTP"):
            vs = (f[0], f[1])
            out[vs] = [int(x) for x in f[2:]]
        elif len(f) == 7 and f[0] == "->" and vs is not None:
            out[(*vs, f[1])] = [int(x) for x in f[2:]]
    return out


def test_status_matches_ipvsadm_and_names_services(topo: Topology, tmp_path: Path) -> None:
    import yaml

    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    objects = [service("web", cluster_ip="10.96.0.10", ports=HTTP),
               slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                        endpoint("10.244.2.12", "node-b")])]
    n = IpvsNode(topo, tmp_path)
    for obj in objects:
        n.publish(obj)
    n.sync()
    assert topo.answers("c1", "http", "10.96.0.10", 80, 6) == {"a": 3, "b": 3}
    hold = topo.hold("c1", "10.96.0.10", 80)
    first = hold.first
    gone = topo.pods[first].ip
    n.publish(slice_("web", endpoints=[e for e in objects[1]["endpoints"]  # type: ignore[index]
                                       if e["addresses"][0] != gone]), EventType.MODIFIED)
    n.sync()
    manifests = tmp_path / "cluster"
    manifests.mkdir()
    (manifests / "all.yaml").write_text(yaml.safe_dump_all(objects))
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        metricsBindAddress: ""
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapathOptions:
          ipvs: {{netns: {topo.node}}}
    """))
    # IPVS folds its per-CPU counters into the totals every 2 s: wait for them
    deadline = time.monotonic() + 15
    while parse_ipvsadm_stats(sh("ipvsadm", "-L", "-n", "--stats", "--exact",
                                 netns=topo.node).stdout)[("TCP", "10.96.0.10:80")][0] < 7:
        assert time.monotonic() < deadline, "IPVS never counted the 7 connections"
        time.sleep(0.5)
    # the slice on disk still lists both pods: the plan labels, the kernel decides
    code, printed = run_cli("status", "--config", str(config), "--manifests", str(manifests),
                            "--node", "node-a", "--stats", "-c", "-o", "json")
    assert code == 0, printed
    view = json.loads(printed)
    raw = parse_ipvsadm_stats(sh("ipvsadm", "-L", "-n", "--stats", "--exact",
                                 netns=topo.node).stdout)
    (fe,) = view["frontends"]
    assert fe["service"] == "default/web:http" and fe["kind"] == "ClusterIP"
    keys = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
    assert [fe["stats"][k] for k in keys] == raw[("TCP", "10.96.0.10:80")]
    assert fe["stats"]["conns"] == 7
    for b in fe["backends"]:
        assert [b["stats"][k] for k in keys] == raw[("TCP", "10.96.0.10:80",
                                                    f"{b['address']}:{b['port']}")]
    # the open connection is listed under its frontend
    assert any(c["backend"] == gone and c["state"] == "ESTABLISHED"
               for c in fe["connections"])
    # a plan from the API (not the stale file) marks the removed pod as draining
    from svcproxy.plugins.ipvs.status import ipvs_status

    frontends = {(f.address, f.port, f.protocol): f.to_json()
                 for f in n.proxy.applied.frontends.values()}
    live = ipvs_status(n.plugin.state.kernel.nl, topo.node, frontends, False)
    states = {b["address"]: b["state"] for b in live["frontends"][0]["backends"]}
    assert states[gone] == "draining" and list(states.values()).count("ok") == 1
    hold.again()
