"""How the nftables datapath writes, against the real kernel: exactly the table
`svcproxy plan -o nft` shows, one transaction per sync, a partial sync that
sends only the changed service port and lists nothing, drift repaired by a full
sync, stale chains deleted later, and nothing outside its table touched."""

from __future__ import annotations

import pytest
from conftest import NODE_IP, Node
from factories import endpoint, service, slice_
from netns import Topology, sh

from svcproxy.bus import EventType
from svcproxy.plugins.kernel.nftables import NftTable, parse_table
from svcproxy.plugins.nftables import nft_options
from svcproxy.plugins.nftables.datapath import render_nft
from svcproxy.plugins.nftables.rules import port_chain_base

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
DNS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]


def nft(topo: Topology, *args: str) -> str:
    return sh("nft", *args, netns=topo.node).stdout


def table(topo: Topology, family: str = "ip") -> NftTable:
    return parse_table(nft(topo, "list", "table", family, "kube-proxy"))


def every_kind(n: Node) -> None:
    """One Service of each frontend kind and policy, dual-stack where it can be."""
    eps = [endpoint("10.244.1.11", "node-a"), endpoint("10.244.2.12", "node-b")]
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30080}], externalIPs=["192.0.2.10"]))
    n.publish(slice_("web", endpoints=eps))
    n.publish(service("sticky", cluster_ip="10.96.0.20", ports=HTTP,
                      sessionAffinity="ClientIP",
                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90}}))
    n.publish(slice_("sticky", endpoints=eps))
    n.publish(service("empty", cluster_ip="10.96.0.30", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30030}]))
    n.publish(service("edge", cluster_ip="10.96.0.40", type="LoadBalancer",
                      externalTrafficPolicy="Local", ports=[{**HTTP[0], "nodePort": 30040}],
                      loadBalancerSourceRanges=["192.168.100.0/24", "10.0.0.0/8"],
                      status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}))
    n.publish(slice_("edge", endpoints=eps))
    n.publish(service("internal", cluster_ip="10.96.0.50", ports=HTTP,
                      internalTrafficPolicy="Local"))
    n.publish(slice_("internal", endpoints=[endpoint("10.244.2.12", "node-b")]))
    n.publish(service("dns", cluster_ip=["10.96.0.53", "fd00:96::53"], ports=DNS))
    n.publish(slice_("dns", name="dns-4", endpoints=eps,
                     ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]))
    n.publish(slice_("dns", name="dns-6", address_type="IPv6",
                     endpoints=[endpoint("fd00:244:1::11", "node-a")],
                     ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]))


def rendered(n: Node, family: int) -> str:
    plan = n.plan()
    return render_nft(plan, nft_options(n.config, family, plan))


def test_kernel_lists_exactly_what_plan_prints(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    for family, word in ((4, "ip"), (6, "ip6")):
        want, have = rendered(n, family), nft(topo, "list", "table", word, "kube-proxy")
        # rule for rule and in the kernel's order; a hash set's elements are
        # listed in the kernel's own order, so those compare as sets
        assert parse_table(have) == parse_table(want), family
        assert [ln for ln in have.splitlines() if "elements" not in ln and ln.startswith(
            "\t\t") and not ln.startswith("\t\t\t")] == [
            ln for ln in want.splitlines() if "elements" not in ln and ln.startswith(
                "\t\t") and not ln.startswith("\t\t\t")]
    kinds = table(topo)
    assert "10.96.0.30 . tcp . 80" in kinds.sets["no-endpoint-services"].elements
    assert kinds.sets["no-endpoint-nodeports"].elements["tcp . 30030"] == "goto reject-chain"
    assert "203.0.113.10 . tcp . 80" in kinds.sets["firewall-ips"].elements
    fw = "firewall-" + port_chain_base("default/edge:http", "tcp")
    assert kinds.chains[fw].rules == (
        "ip saddr != { 10.0.0.0/8, 192.168.100.0/24, 203.0.113.10 } drop",)
    assert any("timeout 1m30s" in s.header for s in kinds.sets.values())


def test_one_transaction_per_sync_and_a_partial_sync_lists_nothing(
        topo: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    # a new table: its declarations (inert while the maps are empty), then
    # every service port's rules and elements at once, over netlink
    kernel = n.plugin.families[4].kernel
    assert kernel.transactions == 2 and kernel.netlink_transactions == 1
    lists: list[int] = []
    state = n.plugin.families[4]
    real_list = state.kernel.list_text
    monkeypatch.setattr(state.kernel, "list_text", lambda: lists.append(1) or real_list())
    sent: list[str] = []
    real_run = state.kernel.run
    monkeypatch.setattr(state.kernel, "run", lambda text: (sent.append(text), real_run(text)))
    before = table(topo)
    n.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                       endpoint("10.244.1.13", "node-a")]), EventType.MODIFIED)
    result = n.sync()
    assert not result.full and not lists
    assert len(sent) == 1  # one transaction, naming only web's chains
    assert "default/web/" in sent[0] and "default/sticky/" not in sent[0] \
        and "default/dns/" not in sent[0]
    after = table(topo)
    changed = {c for c in set(before.chains) | set(after.chains)
               if before.chains.get(c) != after.chains.get(c)}
    assert changed and all("default/web/" in c for c in changed), changed
    # the dispatch maps did not change; the new local endpoint joined the hairpin set
    assert {k: v for k, v in before.sets.items() if k != "hairpin-endpoints"} == \
        {k: v for k, v in after.sets.items() if k != "hairpin-endpoints"}
    assert set(after.sets["hairpin-endpoints"].elements) - set(
        before.sets["hairpin-endpoints"].elements) == {"10.244.1.13 . 10.244.1.13"}
    # nothing changed: nothing sent
    n.sync()
    assert len(sent) == 1


def test_full_sync_repairs_drift_and_leaves_other_tables_alone(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    good = table(topo)
    # someone else's table, and damage to svcproxy's
    sh("nft", "-f", "-", netns=topo.node, stdin="""\
add table inet other
add chain inet other input { type filter hook input priority 0 ; }
add rule inet other input tcp dport 22 accept
add element ip kube-proxy service-ips { 10.96.9.9 . tcp . 80 : drop }
delete element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 }
add chain ip kube-proxy rogue
add rule ip kube-proxy rogue drop
""")
    web = "service-" + port_chain_base("default/web:http", "tcp")
    sh("nft", "flush", "chain", "ip", "kube-proxy", web, netns=topo.node)
    other = nft(topo, "list", "table", "inet", "other")
    result = n.sync(full=True)  # a full sync reads the kernel
    assert result.apply.repaired >= 3
    repaired = table(topo)
    assert repaired.sets == good.sets
    assert repaired.chains[web] == good.chains[web]
    assert repaired.chains["rogue"].rules == ()  # flushed now, deleted later
    assert nft(topo, "list", "table", "inet", "other") == other
    sh("nft", "delete", "table", "inet", "other", netns=topo.node)


def test_stale_chains_are_flushed_then_deleted_a_second_later(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    state = n.plugin.families[4]
    now = [1000.0]
    state.clock = lambda: now[0]
    n.publish(service("sticky", cluster_ip="10.96.0.20", ports=HTTP), EventType.DELETED)
    result = n.sync()
    assert result.apply.followup
    gone = [c for c in table(topo).chains if "default/sticky/" in c]
    assert gone and all(not table(topo).chains[c].rules for c in gone)
    assert not any("affinity-" in s and "sticky" in s for s in table(topo).sets)
    now[0] += 0.5
    n.sync()  # too soon: kept
    assert all(c in table(topo).chains for c in gone)
    now[0] += 1.0
    result = n.sync()
    assert result.apply.details["ipv4"]["chains_deleted"] == len(gone)
    assert not [c for c in table(topo).chains if "default/sticky/" in c]
    assert not result.apply.followup


def test_a_table_of_another_layout_is_rebuilt_in_one_transaction(topo: Topology) -> None:
    """A base chain at another priority (an older kube-proxy, say) cannot be
    changed in place: the table is replaced in the same transaction, and an
    established connection never notices (NAT is decided per connection)."""
    eps = [endpoint("10.244.1.11", "node-a")]
    topo.add_pod("a", "10.244.1.11")
    n = Node(topo, datapath="nftables")
    n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    n.publish(slice_("web", endpoints=eps))
    n.sync()
    held = topo.hold("c1", "10.96.0.10", 80)
    sh("nft", "-f", "-", netns=topo.node, stdin="""\
delete chain ip kube-proxy nat-output
add chain ip kube-proxy nat-output { type nat hook output priority -50 ; }
add rule ip kube-proxy nat-output jump services
""")
    fresh = Node(topo, datapath="nftables")  # a restart: knows nothing
    fresh.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    fresh.publish(slice_("web", endpoints=eps))
    result = fresh.sync()
    assert result.apply.details["ipv4"]["rebuilt"]
    assert "priority -100;" in nft(topo, "list", "chain", "ip", "kube-proxy", "nat-output")
    assert held.again() == {"first": "a", "second": "a"}
    assert topo.answers("c1", "http", "10.96.0.10", 80, 3) == {"a": 3}


def test_node_ports_answer_on_the_primary_address_by_default(topo: Topology) -> None:
    """kube-proxy's nftables mode: an unset nodePortAddresses means the node's
    primary address only (the nodeport-ips set), not every local address."""
    topo.add_pod("a", "10.244.1.11")
    n = Node(topo, datapath="nftables")
    n.publish(service("web", cluster_ip="10.96.0.10", type="NodePort",
                      ports=[{**HTTP[0], "nodePort": 30080}]))
    n.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")]))
    n.sync()
    assert table(topo).sets["nodeport-ips"].elements == {NODE_IP: ""}
    assert topo.answers("c1", "http", NODE_IP, 30080, 2) == {"a": 2}
    assert topo.answers("c2", "http", "198.51.100.1", 30080, 2) != {"a": 2}


def test_cleanup_deletes_the_tables_and_nothing_else(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    sh("nft", "add", "table", "ip", "mine", netns=topo.node)
    lines = n.host.cleanup()
    assert any("ip kube-proxy" in ln for ln in lines) and any("ip6 kube-proxy" in ln
                                                               for ln in lines)
    assert nft(topo, "list", "tables").split() == ["table", "ip", "mine"]


def test_preview_names_the_first_syncs_statements_and_sends_none(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    lines = n.preview()
    assert lines[0] == 'nft add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    assert any(ln.startswith("nft add element ip kube-proxy service-ips {") for ln in lines)
    assert "kube-proxy" not in nft(topo, "list", "tables")  # nothing was sent
    n.sync()
    assert n.preview() == []  # the table is what a first sync would make
    sh("nft", "delete", "element", "ip", "kube-proxy", "cluster-ips", "{", "10.96.0.10", "}",
       netns=topo.node)
    assert n.preview() == ["nft add element ip kube-proxy cluster-ips { 10.96.0.10 }"]


def test_a_full_sync_lists_only_after_someone_elses_commit(topo: Topology) -> None:
    n = Node(topo, datapath="nftables")
    every_kind(n)
    n.sync()
    again = n.sync(full=True).apply.details["ipv4"]
    assert not again["listed"]  # nobody committed since: nothing to read back
    sh("nft", "add", "table", "ip", "other", netns=topo.node)  # anybody's commit
    after = n.sync(full=True).apply.details["ipv4"]
    assert after["listed"] and after["chains_written"] == 0 and after["elements"] == 0
    sh("nft", "delete", "table", "ip", "other", netns=topo.node)


def test_table_existence_is_asked_over_netlink_as_nft_lists_it(topo: Topology) -> None:
    """table_exists (NFT_MSG_GETTABLE, which spares delete_table and the first
    listing an nft process on the usual node without the table) agrees with
    `nft list tables`: per family, and not fooled by a same-named table of
    another family."""
    from svcproxy.plugins.kernel.nftables import NftKernel, table_exists

    node = topo.node
    assert (table_exists(4, "kube-proxy", node), table_exists(6, "kube-proxy", node)) \
        == (False, False)
    sh("nft", "add table inet kube-proxy; add table ip6 kube-proxy", netns=node)
    assert (table_exists(4, "kube-proxy", node), table_exists(6, "kube-proxy", node)) \
        == (False, True)
    assert NftKernel(4, node).delete_table() is False
    assert NftKernel(4, node).list_text() is None
    assert NftKernel(6, node).delete_table() is True
    assert sh("nft", "list", "tables", netns=node).stdout.split() == ["table", "inet",
                                                                       "kube-proxy"]
    assert table_exists(6, "kube-proxy", node) is False
    sh("nft", "delete table inet kube-proxy", netns=node)
