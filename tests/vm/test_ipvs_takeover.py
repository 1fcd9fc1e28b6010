"""Taking over a node that kube-proxy's IPVS mode programmed, in place.

The node is first programmed as kube-proxy leaves it (kube-proxy-behaviour.md
1.2-1.8, and pkg/proxy/ipvs/proxier.go's writeIptablesRules for the rule
spelling): kube-ipvs0 with the ClusterIPs, the virtual and real servers with
`ipvsadm -R`, its ipsets with `ipset restore`, its chains with
`iptables-restore --noflush`, its sysctls: written by the kernel tools, not by
svcproxy. kube-proxy is one step behind the cluster: an endpoint it has not
seen yet (c), and one it is draining (d, weight 0, a connection still open).
With connections held open through a ClusterIP and a NodePort (TCP and UDP),
svcproxy's preview names the real differences, its first sync changes exactly
those (counted independently from the kernel before and after; untouched rules
keep their packet counters), every connection still answers, and a restart of
svcproxy itself changes nothing."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import ProxyHarness, endpoint, service, slice_
from netns import Topology, ipset_save, sh

from svcproxy.plugins.iptables import rule_options
from svcproxy.plugins.iptables.datapath import render_iptables_save

NODE_IP = "192.168.100.1"
WEB_VIP, DNS_VIP = "10.96.0.10", "10.96.0.53"
WEB = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}]
WEB_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
#: flows held across the takeover: TCP through a ClusterIP and a NodePort, UDP too
TCP_FLOWS = {"cluster-ip": (WEB_VIP, 80), "node-port": (NODE_IP, 30080)}
UDP_FLOWS = {"udp-cluster-ip": (DNS_VIP, 53), "udp-node-port": (NODE_IP, 30053)}
PODS = {"a": ("10.244.1.11", "node-a"), "b": ("10.244.2.12", "node-b"),
        "c": ("10.244.3.13", "node-c"), "d": ("10.244.4.14", "node-d"),
        "u": ("10.244.1.53", "node-a")}

#: kube-proxy's ipsets (kube-proxy-behaviour.md 1.7): name -> type
KUBE_PROXY_SETS = {
    "KUBE-LOOP-BACK": "hash:ip,port,ip", "KUBE-CLUSTER-IP": "hash:ip,port",
    "KUBE-EXTERNAL-IP": "hash:ip,port", "KUBE-EXTERNAL-IP-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER": "hash:ip,port", "KUBE-LOAD-BALANCER-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER-FW": "hash:ip,port", "KUBE-LOAD-BALANCER-SOURCE-IP": "hash:ip,port,ip",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": "hash:ip,port,net", "KUBE-NODE-PORT-TCP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-TCP": "bitmap:port", "KUBE-NODE-PORT-UDP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-UDP": "bitmap:port", "KUBE-NODE-PORT-SCTP-HASH": "hash:ip,port",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": "hash:ip,port", "KUBE-HEALTH-CHECK-NODE-PORT": "bitmap:port",
    "KUBE-IPVS-IPS": "hash:ip",
}
CIP = "Kubernetes service cluster ip + port for masquerade purpose"
LOOP = "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"

#: what kube-proxy's IPVS mode restores for this cluster, in its own spelling
#: (--or-mark / --xor-mark; iptables prints them as --set-xmark)
KUBE_PROXY_RULES = f"""\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-POSTROUTING -m comment --comment "{LOOP}" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "{CIP}" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-I PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-I POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
-I FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-I INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-I INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-I FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-I INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-I OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
COMMIT
"""


def kube_proxy_node(topo: Topology) -> None:
    """kube-proxy's state, written with the kernel tools, as it was while web's
    only endpoint was d (the ClusterIP; the NodePort already as below)."""
    ns = topo.node
    for name, value in (("net.ipv4.vs.conntrack", "1"), ("net.ipv4.vs.expire_nodest_conn", "1"),
                        ("net.ipv4.vs.expire_quiescent_template", "1"),
                        ("net.ipv4.ip_forward", "1")):
        sh("sysctl", "-q", "-w", f"{name}={value}", netns=ns)
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy", netns=ns)
    for vip in (WEB_VIP, DNS_VIP):
        sh("ip", "addr", "add", f"{vip}/32", "dev", "kube-ipvs0", netns=ns)
    lines = [f"-A -t {WEB_VIP}:80 -s rr", f"-a -t {WEB_VIP}:80 -r {PODS['d'][0]}:8080 -m -w 1",
             f"-A -t {NODE_IP}:30080 -s rr"]
    for pod, weight in (("a", 1), ("b", 1), ("d", 0)):
        lines.append(f"-a -t {NODE_IP}:30080 -r {PODS[pod][0]}:8080 -m -w {weight}")
    for vs in (f"-u {DNS_VIP}:53", f"-u {NODE_IP}:30053"):
        lines += [f"-A {vs} -s rr", f"-a {vs} -r {PODS['u'][0]}:5353 -m -w 1"]
    sh("ipvsadm", "-R", stdin="\n".join(lines) + "\n", netns=ns)
    sets = []
    for name, kind in KUBE_PROXY_SETS.items():
        opts = "range 0-65535" if kind.startswith("bitmap") else \
            "family inet hashsize 1024 maxelem 65536"
        sets.append(f"create {name} {kind} {opts}")
    members = {"KUBE-CLUSTER-IP": [f"{WEB_VIP},tcp:80", f"{DNS_VIP},udp:53"],
               "KUBE-IPVS-IPS": [WEB_VIP, DNS_VIP],
               "KUBE-NODE-PORT-TCP": ["30080"], "KUBE-NODE-PORT-UDP": ["30053"],
               "KUBE-LOOP-BACK": [f"{PODS['a'][0]},tcp:8080,{PODS['a'][0]}",
                                  f"{PODS['u'][0]},udp:5353,{PODS['u'][0]}"]}
    sets += [f"add {name} {m}" for name, ms in members.items() for m in ms]
    sh("ipset", "restore", stdin="\n".join(sets) + "\n", netns=ns)
    sh("iptables-restore", "--noflush", stdin=KUBE_PROXY_RULES, netns=ns)


def kernel_view(ns: str) -> dict[str, Any]:
    """The node as the kernel tools show it: the independent view."""
    ipvs: dict[str, str] = {}
    for line in sh("ipvsadm", "-S", "-n", netns=ns).stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["-A"]:
            ipvs[" ".join(parts[1:3])] = line
        elif parts[:1] == ["-a"]:
            ipvs[" ".join(parts[1:5])] = line
    chains: dict[str, list[str]] = {}
    counters: dict[str, list[str]] = {}
    for table in ("nat", "filter"):
        for line in sh("iptables-save", "-c", "-t", table, netns=ns).stdout.splitlines():
            if line.startswith(":"):
                name = line[1:].split()[0]
                chains.setdefault(f"{table}/{name}", [])
                counters.setdefault(f"{table}/{name}", [])
            elif line.startswith("["):
                count, rule = line.split("] ", 1)
                name = rule.split()[1]
                chains.setdefault(f"{table}/{name}", []).append(rule)
                counters.setdefault(f"{table}/{name}", []).append(count)
    shown = sh("ip", "-j", "addr", "show", "kube-ipvs0", netns=ns, check=False)
    addrs = json.loads(shown.stdout) if shown.returncode == 0 else []
    bound = {a["local"] for link in addrs for a in link.get("addr_info", [])}
    return {"ipvs": ipvs, "chains": chains, "counters": counters,
            "sets": ipset_save(ns), "bound": bound}


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every kernel object that differs: a virtual or real server added, removed
    or changed, a chain whose rules differ, a set member, a bound address."""
    out = []
    for key in sorted(set(before["ipvs"]) | set(after["ipvs"])):
        if before["ipvs"].get(key) != after["ipvs"].get(key):
            out.append(f"ipvs {key}: {before['ipvs'].get(key)} -> {after['ipvs'].get(key)}")
    for chain in sorted(set(before["chains"]) | set(after["chains"])):
        if before["chains"].get(chain) != after["chains"].get(chain):
            out.append(f"chain {chain}")
    for name in sorted(set(before["sets"]) | set(after["sets"])):
        for m in sorted(before["sets"].get(name, set()) ^ after["sets"].get(name, set())):
            out.append(f"set {name} {m}")
    out += [f"address {a}" for a in sorted(before["bound"] ^ after["bound"])]
    return out


class Node(ProxyHarness):
    def __init__(self, topo: Topology, tmp: Path) -> None:
        text = textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: ipvs
            clusterCIDR: 10.244.0.0/16
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            datapaths: [ipvs]
            datapathOptions:
              ipvs: {{netns: {topo.node}, drainIgnoresInactive: true,
                     sysctlBackup: {tmp / 'sysctl.json'}}}
        """)
        super().__init__(text, "ipvs", [NODE_IP], start=True)
        publish_cluster(self)


def publish_cluster(h: ProxyHarness) -> None:
    """The cluster now: web -> a, b, c (d is gone), dns -> u."""
    h.publish(service("web", cluster_ip=WEB_VIP, type="NodePort", ports=WEB))
    h.publish(service("dns", cluster_ip=DNS_VIP, type="NodePort", ports=DNS))
    h.publish(slice_("web", ports=WEB_EP, endpoints=[
        endpoint(PODS[p][0], PODS[p][1]) for p in ("a", "b", "c")]))
    h.publish(slice_("dns", ports=DNS_EP, endpoints=[endpoint(*PODS["u"])]))


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    try:
        t.create_node()
        t.add_client("c1", "192.168.100.2", NODE_IP)
        for name, (ip, _) in PODS.items():
            t.add_pod(name, ip)
        yield t
    finally:
        t.close()


def test_takeover_from_kube_proxy_ipvs_mode(topo: Topology, tmp_path: Path) -> None:
    ns = topo.node
    kube_proxy_node(topo)
    # a connection lands on d, then kube-proxy sees a and b come and d go:
    # it adds them and drains d (weight 0), as its graceful termination does
    on_d = topo.hold("c1", WEB_VIP, 80)
    assert on_d.first == "d"
    for pod in ("a", "b"):
        sh("ipvsadm", "-a", "-t", f"{WEB_VIP}:80", "-r", f"{PODS[pod][0]}:8080", "-m",
           netns=ns)
    sh("ipvsadm", "-e", "-t", f"{WEB_VIP}:80", "-r", f"{PODS['d'][0]}:8080", "-m", "-w", "0",
       netns=ns)
    # connections through kube-proxy's rules, held across the takeover
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    assert flows.first == {"cluster-ip": flows.first["cluster-ip"],
                           "node-port": flows.first["node-port"],
                           "udp-cluster-ip": "u", "udp-node-port": "u"}
    assert {flows.first["cluster-ip"], flows.first["node-port"]} <= {"a", "b"}
    before = kernel_view(ns)

    n = Node(topo, tmp_path)
    preview = n.preview()
    assert kernel_view(ns) == before  # the preview changed nothing
    c = PODS["c"][0]
    d = PODS["d"][0]
    assert sorted(preview) == sorted([
        f"ipvsadm -a -t {WEB_VIP}:80 -r {c}:8080 -m -w 1",
        f"ipvsadm -a -t {NODE_IP}:30080 -r {c}:8080 -m -w 1",
        # d drains where a connection holds it, and goes where none does
        # (as kube-proxy's graceful termination would)
        f"ipvsadm -d -t {NODE_IP}:30080 -r {d}:8080",
        # svcproxy's one addition to kube-proxy's layout: node traffic from a VIP
        # is masqueraded (docs/ipvs.md)
        "iptables -t nat write KUBE-POSTROUTING (5 rules)",
    ]), preview
    result = n.sync()
    after = kernel_view(ns)
    diff = differences(before, after)
    # exactly the real differences, counted from the kernel: two real servers
    # added, one drained one removed, one chain rewritten; the ClusterIP's d
    # keeps draining at weight 0 while its connection is open
    assert diff == [f"ipvs -t {WEB_VIP}:80 -r {c}:8080: None -> -a -t {WEB_VIP}:80 -r "
                    f"{c}:8080 -m -w 1",
                    f"ipvs -t {NODE_IP}:30080 -r {c}:8080: None -> -a -t {NODE_IP}:30080 -r "
                    f"{c}:8080 -m -w 1",
                    f"ipvs -t {NODE_IP}:30080 -r {d}:8080: -a -t {NODE_IP}:30080 -r {d}:8080 "
                    "-m -w 0 -> None",
                    "chain nat/KUBE-POSTROUTING"], diff
    assert result.apply.changes == len(diff) == len(preview)
    assert result.apply.details["draining"] == 1
    assert f"-a -t {WEB_VIP}:80 -r {d}:8080 -m -w 0" in after["ipvs"].values()
    # nothing flushed: every other chain kept its packet counters
    for chain, counts in before["counters"].items():
        if chain != "nat/KUBE-POSTROUTING":
            assert after["counters"][chain] == counts, chain

    # every connection still answers, on the same backend
    flows.check()
    assert on_d.again() == {"first": "d", "second": "d"}
    # new connections reach the new endpoint too
    assert set(topo.answers("c1", "http", WEB_VIP, 80, 9)) == {"a", "b", "c"}
    # d's connection is closed: the next sync ends its drain
    n.sync()
    assert PODS["d"][0] not in " ".join(kernel_view(ns)["ipvs"].values())

    # a restart of svcproxy itself (a fresh process knows nothing): nothing to do
    settled = kernel_view(ns)
    again = Node(topo, tmp_path)
    assert again.preview() == []
    assert again.sync().apply.changes == 0
    assert differences(settled, kernel_view(ns)) == []
    assert flows.udp_answers() == {"udp-cluster-ip": "u", "udp-node-port": "u"}


def test_takeover_from_kube_proxy_iptables_mode_by_the_ipvs_datapath(
        topo: Topology, tmp_path: Path) -> None:
    """A node kube-proxy ran in iptables mode, taken over by the IPVS datapath:
    established flows keep their conntrack entries (iptables mode's DNAT) while
    new connections go through IPVS, and once IPVS serves, iptables mode's own
    chains and jumps are removed (the shared ones are IPVS mode's by then)."""
    ns = topo.node
    last = ProxyHarness(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: iptables
        clusterCIDR: 10.244.0.0/16
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [iptables]
        datapathOptions:
          iptables: {{netns: {ns}}}
    """), "iptables", [NODE_IP])
    publish_cluster(last)
    plan = last.plan()
    sh("iptables-restore", "--noflush",
       stdin=render_iptables_save(plan, rule_options(last.config, 4, plan)), netns=ns)
    sh("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1", netns=ns)
    iptables_mode = {c for c in kernel_view(ns)["chains"]
                     if c.split("/")[1].startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-"))}
    assert len(iptables_mode) >= 8
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)

    n = Node(topo, tmp_path)
    preview = n.preview()
    removed = [line for line in preview if " -X " in line]
    assert len(removed) == len(iptables_mode) + 4  # + KUBE-NODEPORTS (nat, filter),
    #                     filter KUBE-SERVICES and KUBE-EXTERNAL-SERVICES
    n.sync()
    after = kernel_view(ns)
    left = [c for c in after["chains"] if c in iptables_mode or c in (
        "nat/KUBE-NODEPORTS", "filter/KUBE-NODEPORTS", "filter/KUBE-SERVICES",
        "filter/KUBE-EXTERNAL-SERVICES")]
    assert left == []
    assert not any("KUBE-SERVICES" in r and "conntrack --ctstate NEW" in r
                   for r in after["chains"]["filter/FORWARD"])  # iptables mode's jump
    assert f"-t {WEB_VIP}:80" in after["ipvs"]
    # established flows still answer, from the same pod; new ones through IPVS
    flows.check()
    assert topo.answers("c1", "http", WEB_VIP, 80, 9) == {"a": 3, "b": 3, "c": 3}  # rr
    # and a restart finds nothing left to do
    assert Node(topo, tmp_path).preview() == []


def test_switch_from_the_ipvs_datapath_to_nftables(topo: Topology, tmp_path: Path) -> None:
    """IPVS -> nftables on a live node. nftables' first sync DNATs every new
    connection before IPVS sees it; the connections IPVS set up keep their
    connection entries and keep answering from their backend; each virtual
    server goes once its connections are gone (a closed TCP connection, a UDP
    flow idle past IPVS's UDP timeout), then kube-ipvs0, the helper ipsets and
    the helper chains: nothing of IPVS is left."""
    import time

    ns = topo.node
    sh("ipvsadm", "--set", "0", "0", "3", netns=ns)  # UDP entries expire 3 s after use
    n = Node(topo, tmp_path)
    n.sync()
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    before = sh("ipvsadm", "-L", "-n", "-c", netns=ns).stdout
    assert before.count("ESTABLISHED") == 2, before

    nft = ProxyHarness(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: nftables
        clusterCIDR: 10.244.0.0/16
        nodePortAddresses: [all]
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [nftables]
        datapathOptions:
          nftables: {{netns: {ns}}}
    """), "nftables", [NODE_IP])
    publish_cluster(nft)
    result = nft.sync()
    # the TCP virtual servers hold their established connections (the UDP
    # ones may already be idle past IPVS's 3 s and gone, with their
    # conntrack entries: the next datagram is nftables')
    assert result.apply.details["ipvs_draining"] >= 2
    # new connections: DNATed by nftables (its counters), none new in IPVS
    # (30 tries miss one of three backends 1 in 60,000)
    assert set(topo.answers("c1", "http", WEB_VIP, 80, 30)) == {"a", "b", "c"}
    table = sh("nft", "list", "table", "ip", "kube-proxy", netns=ns).stdout
    assert sum(int(p) for p in re.findall(r"counter packets (\d+)", table)) >= 30
    assert sh("ipvsadm", "-L", "-n", "-c", netns=ns).stdout.count("ESTABLISHED") == 2
    flows.check()  # every held flow answered by its first backend; TCP now closed
    plugin = nft.plugin
    deadline = time.monotonic() + 60
    while True:
        plugin.ipvs_checked = 0.0  # look again now, not in IPVS_RECHECK seconds
        details = nft.sync().apply.details
        if not details.get("ipvs_draining"):
            break
        assert time.monotonic() < deadline, details
        time.sleep(1)
    view = kernel_view(ns)
    assert view["ipvs"] == {} and view["bound"] == set()
    assert not [c for c in view["chains"] if "/KUBE-" in c], view["chains"]
    assert not [s for s in ipset_save(ns) if s.startswith("KUBE-")]
    assert sh("ip", "link", "show", "kube-ipvs0", netns=ns, check=False).returncode != 0
    assert set(topo.answers("c1", "http", NODE_IP, 30080, 30)) == {"a", "b", "c"}
