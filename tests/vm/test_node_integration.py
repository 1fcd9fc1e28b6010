"""Node integration inside the VM: strictARP (metallb plugin) with real ARP on a
bridge, and the conntrack section landing in /proc/sys — both put back by
cleanup."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import ProxyHarness, endpoint, only_plugins, service, slice_
from netns import Topology, in_namespace, sh

from svcproxy.config import parse_config
from svcproxy.manager import PluginHost

LB_IP = "203.0.113.50"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


@pytest.fixture
def lan() -> Iterator[tuple[Topology, str]]:
    """The node and a peer namespace on one bridge (in a third namespace)."""
    t = Topology()
    try:
        t.create_node()
        bridge = t._ns("lan")
        peer = t._ns("peer")
        sh("ip", "link", "add", "br0", "type", "bridge", netns=bridge)
        sh("ip", "link", "set", "br0", "up", netns=bridge)
        for ns, port, ip in ((t.node, "b-node", "192.168.70.1/24"),
                             (peer, "b-peer", "192.168.70.2/24")):
            sh("ip", "link", "add", "lan0", "netns", ns, "type", "veth", "peer", "name", port,
               "netns", bridge)
            sh("ip", "link", "set", port, "master", "br0", "up", netns=bridge)
            sh("ip", "addr", "add", ip, "dev", "lan0", netns=ns)
            sh("ip", "link", "set", "lan0", "up", netns=ns)
        # the peer asks for the LoadBalancer IP on the LAN directly (as a router
        # in front of MetalLB does)
        sh("ip", "route", "add", f"{LB_IP}/32", "dev", "lan0", netns=peer)
        yield t, peer
    finally:
        t.close()


def node(t: Topology, tmp: Path, strict: bool, scope: str = "all") -> ProxyHarness:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        metricsBindAddress: ""
        healthzBindAddress: ""
        ipvs: {{strictARP: {str(strict).lower()}}}
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        {only_plugins("loadbalancer", "metallb")}
        enable:
          - name: metallb
            options: {{arpScope: {scope}, sysctlBackup: {tmp / 'arp.json'}}}
        datapaths: [ipvs]
        datapathOptions:
          ipvs: {{netns: {t.node}, sysctlBackup: {tmp / 'ipvs.json'}}}
    """)
    h = ProxyHarness(text, "ipvs", ["192.168.70.1"])
    h.publish(service("lb", cluster_ip="10.96.0.50", type="LoadBalancer",
                      ports=[{**HTTP[0], "nodePort": 30500}],
                      status={"loadBalancer": {"ingress": [{"ip": LB_IP}]}}))
    h.publish(slice_("lb", endpoints=[endpoint("10.244.1.11", "node-a")]))
    h.host.start("ipvs", [], "node-a")
    h.sync()
    return h


def node_answers_arp(peer: str) -> bool:
    sh("ip", "neigh", "flush", "dev", "lan0", netns=peer)
    # any packet to the LB IP makes the peer resolve it on the LAN (a socket
    # made inside the peer's namespace, in-process: a Python start costs
    # seconds under emulation)
    def knock() -> None:
        with socket.socket() as s:
            s.settimeout(1.5)
            s.connect_ex((LB_IP, 80))

    in_namespace(peer, knock)
    neigh = sh("ip", "neigh", "show", LB_IP, "dev", "lan0", netns=peer).stdout
    return "lladdr" in neigh


def arp_values(t: Topology, iface: str = "all") -> tuple[str, str]:
    def read(key: str) -> str:
        return str(sh("sysctl", "-n", f"net.ipv4.conf.{iface}.{key}",
                      netns=t.node).stdout.strip())

    return read("arp_ignore"), read("arp_announce")


def test_strict_arp_stops_answers_for_lb_ips_and_is_reverted(
        lan: tuple[Topology, str], tmp_path: Path) -> None:
    t, peer = lan
    h = node(t, tmp_path, strict=False)
    assert LB_IP in sh("ip", "addr", "show", "kube-ipvs0", netns=t.node).stdout
    assert node_answers_arp(peer), "without strictARP the node answers for kube-ipvs0's IPs"
    h.host.stop()

    h = node(t, tmp_path, strict=True)
    assert arp_values(t) == ("1", "2")
    assert not node_answers_arp(peer), "with strictARP the node must not answer"
    h.host.stop()

    # turned off again: the previous values come back (upstream never reverts)
    h = node(t, tmp_path, strict=False)
    assert arp_values(t) == ("0", "0")
    assert node_answers_arp(peer)
    h.host.stop()

    # scoped to the uplinks and kube-ipvs0: "all" stays as it was
    h = node(t, tmp_path, strict=True, scope="interfaces")
    assert arp_values(t) == ("0", "0")
    assert arp_values(t, "lan0") == ("1", "2")
    assert arp_values(t, "kube-ipvs0") == ("1", "2")
    assert not node_answers_arp(peer)
    lines = h.host.cleanup()
    assert any("lan0.arp_ignore restored to 0" in line for line in lines), lines
    assert arp_values(t, "lan0") == ("0", "0")
    h.host.stop()


def test_conntrack_settings_land_in_proc_and_are_restored(tmp_path: Path) -> None:
    sh("modprobe", "nf_conntrack")
    names = {"max": "net.netfilter.nf_conntrack_max",
             "est": "net.netfilter.nf_conntrack_tcp_timeout_established",
             "cw": "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
             "lib": "net.netfilter.nf_conntrack_tcp_be_liberal",
             "udp": "net.netfilter.nf_conntrack_udp_timeout",
             "stream": "net.netfilter.nf_conntrack_udp_timeout_stream"}

    def read() -> dict[str, str]:
        values = {k: str(sh("sysctl", "-n", v).stdout.strip()) for k, v in names.items()}
        values["hash"] = Path("/sys/module/nf_conntrack/parameters/hashsize").read_text().strip()
        return values

    sh("sysctl", "-qw", f"{names['max']}=65536")
    before = read()
    config = parse_config(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        conntrack:
          maxPerCore: 100000
          min: 1000
          tcpEstablishedTimeout: 2h
          tcpCloseWaitTimeout: 30m
          tcpBeLiberal: true
          udpTimeout: 45s
          udpStreamTimeout: 100s
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        {only_plugins("conntrack")}
        enable: [{{name: conntrack, options: {{sysctlBackup: {tmp_path / 'ct.json'}}}}}]
        datapaths: [iptables]
    """), "conntrack-test.yaml")
    host = PluginHost(config)
    host.configure()
    host.start("iptables", [], "node-a")
    after = read()
    cpus = int(sh("nproc").stdout.strip())
    assert after["max"] == str(100000 * cpus)  # maxPerCore x CPUs, above min
    assert int(after["hash"]) >= 100000 * cpus // 4
    assert (after["est"], after["cw"], after["lib"], after["udp"], after["stream"]) == (
        "7200", "1800", "1", "45", "100")
    lines = host.cleanup()
    assert any("nf_conntrack_max restored to 65536" in line for line in lines), lines
    restored = read()
    assert {k: v for k, v in restored.items() if k != "hash"} == \
        {k: v for k, v in before.items() if k != "hash"}
    assert restored["hash"] == before["hash"]
