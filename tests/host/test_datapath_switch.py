"""Switching a live node between the netfilter datapaths, both ways: the new
datapath's first full sync programs the node while the old one's rules are
still there, and only then are those removed. TCP connections and UDP flows
held open across the switch (through a ClusterIP and a NodePort) keep
answering from the backend they started with, new connections go through the
new datapath, and nothing of the old one is left. (IPVS -> nftables runs in the
VM tier.)"""

from __future__ import annotations

import pytest
from conftest import NODE_IP, Node
from factories import endpoint, service, slice_
from netns import Topology, sh

from svcproxy.plugins.iptables.rules import is_owned
from svcproxy.plugins.kernel.iptables import parse_save

WEB = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}]
DNS_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
TCP_FLOWS = {"cluster-ip": ("10.96.0.10", 80), "node-port": (NODE_IP, 30080)}
UDP_FLOWS = {"udp-cluster-ip": ("10.96.0.53", 53), "udp-node-port": (NODE_IP, 30053)}


def iptables_chains(topo: Topology) -> list[tuple[str, str]]:
    out = []
    for table in ("filter", "nat"):
        text = sh("iptables-nft-save", "-t", table, netns=topo.node).stdout
        out += [(table, c) for c in parse_save(text).get(table, None).chains  # type: ignore[union-attr]
                if is_owned(table, c)]
    return out


def nft_tables(topo: Topology) -> str:
    return sh("nft", "list", "tables", netns=topo.node).stdout


def publish(n: Node) -> None:
    eps = [endpoint("10.244.1.11", "node-a"), endpoint("10.244.2.12", "node-b")]
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort", ports=WEB))
    n.publish(slice_("web", endpoints=eps))
    n.publish(service("dns", cluster_ip="10.96.0.53", type="NodePort", ports=DNS))
    n.publish(slice_("dns", endpoints=eps, ports=DNS_EP))


@pytest.mark.parametrize(("old", "new"), [("iptables", "nftables"), ("nftables", "iptables")])
def test_switch_keeps_every_established_flow(topo: Topology, old: str, new: str) -> None:
    topo.add_pod("a", "10.244.1.11")
    topo.add_pod("b", "10.244.2.12")
    extra = "nodePortAddresses: [all]"  # the same NodePort addresses in both modes
    before = Node(topo, extra_config=extra, datapath=old)
    publish(before)
    before.sync()
    flows = topo.hold_flows("c1", TCP_FLOWS, UDP_FLOWS)
    assert (iptables_chains(topo) != []) == (old == "iptables")
    # svcproxy restarted with the other mode: a fresh process knows nothing
    after = Node(topo, extra_config=extra, datapath=new)
    publish(after)
    result = after.sync()
    assert result.full and result.apply.details["retired"]
    flows.check()
    for host, port in (("10.96.0.10", 80), (NODE_IP, 30080)):
        assert set(topo.answers("c1", "http", host, port, 30)) == {"a", "b"}, (host, port)
    if new == "nftables":
        assert iptables_chains(topo) == []
        assert "kube-proxy" in nft_tables(topo)
    else:
        assert "kube-proxy" not in nft_tables(topo)
        assert ("nat", "KUBE-SERVICES") in iptables_chains(topo)
    # a second start of the same mode has nothing left to remove
    again = Node(topo, extra_config=extra, datapath=new)
    publish(again)
    assert again.sync().apply.details["retired"] == []
