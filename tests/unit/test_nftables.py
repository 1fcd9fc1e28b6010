"""The nftables datapath's rendering and reconciler against a fake of the nft
door (svcproxy.plugins.kernel.fakes.FakeNft), as kube-proxy tests its
nftables proxier against knftables' fake. The fake checks what the kernel
checks where it matters (references, busy chains and sets, atomic
transactions); tests/host/test_nftables_sync.py runs the same code against the
real kernel, tests/host/test_netfilter_traffic.py with traffic."""

from __future__ import annotations

from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_

from svcproxy.ir import ServiceMap
from svcproxy.plugins.kernel.fakes import FakeNft
from svcproxy.plugins.kernel.tools import KernelError
from svcproxy.plugins.nftables.datapath import FamilyState, sync_family
from svcproxy.plugins.nftables.rules import (
    NftOptions,
    anonymous_set,
    duration,
    endpoint_base,
    port_chain_base,
)

NODE_IP = "192.168.1.10"
TCP80 = {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 80}
EP_PORTS = [{"name": "p80", "port": 80, "protocol": "TCP"}]


class Proxier:
    """One family's table on a fake door (NewFakeProxier)."""

    def __init__(self, **options: Any) -> None:
        self.kernel = FakeNft()
        self.state = FamilyState(self.kernel)  # type: ignore[arg-type]
        self.now = 1000.0
        self.state.clock = lambda: self.now
        self.opts = NftOptions(**{"local_detector": ("saddr", "10.0.0.0/8"), **options})
        self.plan = ServiceMap()

    def sync(self, *objects: dict[str, Any], partial: bool = True) -> Any:
        plan = plan_of([node("node-a", ips=[NODE_IP]), *objects])
        changed = None
        if partial:
            keys = set(plan.frontends) | set(self.plan.frontends)
            changed = {k for k in keys if plan.frontends.get(k) != self.plan.frontends.get(k)}
        result = sync_family(self.state, plan, changed, self.opts)
        self.plan = plan
        return result

    def chain(self, name: str) -> tuple[str, ...]:
        assert self.kernel.table is not None
        return self.kernel.table.chains[name].rules

    def elements(self, name: str) -> dict[str, str]:
        assert self.kernel.table is not None
        return self.kernel.table.sets[name].elements


def svc1(**kw: Any) -> dict[str, Any]:
    return service("svc1", namespace="ns1", cluster_ip="172.30.0.41",
                   **{"ports": [TCP80], **kw})


def eps1(*ips: str) -> dict[str, Any]:
    return slice_("svc1", namespace="ns1", ports=EP_PORTS,
                  endpoints=[endpoint(ip, "node-a" if i == 0 else "node-b")
                             for i, ip in enumerate(ips)])


def test_chain_names_are_kube_proxys() -> None:
    """servicePortChainNameBase / servicePortEndpointChainNameBase: the names
    kube-proxy's own source gives as examples, so a table it wrote is ours."""
    assert port_chain_base("ns1/svc1:p80", "tcp") == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert endpoint_base("ns1/svc1:p80", "tcp", "10.180.0.1", 80) == \
        "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


def test_canonical_text_helpers() -> None:
    assert duration(10800) == "3h" and duration(90) == "1m30s" and duration(86400) == "1d"
    assert anonymous_set(["192.168.0.0/16", "10.1.0.0/16", "10.0.0.0/8", "5.6.7.8/32"]) == \
        "{ 5.6.7.8, 10.0.0.0/8, 192.168.0.0/16 }"
    assert anonymous_set(["fd00::/64"]) == "fd00::/64"


def test_cluster_ip_endpoints_by_numgen() -> None:
    """TestClusterIP-like: off-cluster sources to a ClusterIP are marked for
    masquerade, the ClusterIP dispatches to the service chain, which DNATs to
    one of three endpoints with equal chance (1/3, then 1/2, then the rest),
    counting each; an endpoint that reaches itself is masqueraded through one
    shared set."""
    p = Proxier()
    p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2", "10.180.0.3"))
    svc = "service-" + port_chain_base("ns1/svc1:p80", "tcp")
    assert p.elements("service-ips") == {"172.30.0.41 . tcp . 80": f"goto {svc}"}
    assert p.elements("cluster-ips") == {"172.30.0.41": ""}
    dnat = "counter packets 0 bytes 0 dnat to"
    assert p.chain("services")[0] == \
        "ip daddr @cluster-ips ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
    assert p.chain(svc) == (
        f"meta l4proto tcp numgen random mod 3 0 {dnat} 10.180.0.1:80",
        f"meta l4proto tcp numgen random mod 2 0 {dnat} 10.180.0.2:80",
        f"meta l4proto tcp {dnat} 10.180.0.3:80")
    # only an endpoint on this node can reach itself through this node
    assert p.elements("hairpin-endpoints") == {"10.180.0.1 . 10.180.0.1": ""}
    assert p.chain("masquerading")[0] == (
        "ct status dnat ip saddr . ip daddr @hairpin-endpoints masquerade fully-random")
    assert not [c for c in p.kernel.table.chains if c.startswith("endpoint-")]  # type: ignore[union-attr]


def test_session_affinity_goes_through_endpoint_chains() -> None:
    p = Proxier()
    p.sync(svc1(sessionAffinity="ClientIP"), eps1("10.180.0.1", "10.180.0.2"))
    svc = "service-" + port_chain_base("ns1/svc1:p80", "tcp")
    eps = [endpoint_base("ns1/svc1:p80", "tcp", f"10.180.0.{i}", 80) for i in (1, 2)]
    assert p.chain(svc) == (
        f"ip saddr @affinity-{eps[0]} goto endpoint-{eps[0]}",
        f"ip saddr @affinity-{eps[1]} goto endpoint-{eps[1]}",
        f"numgen random mod 2 0 goto endpoint-{eps[0]}", f"goto endpoint-{eps[1]}")
    assert p.chain(f"endpoint-{eps[0]}") == (
        f"update @affinity-{eps[0]} {{ ip saddr }}",
        "meta l4proto tcp counter packets 0 bytes 0 dnat to 10.180.0.1:80")


def test_weights_shape_the_numgen_tests() -> None:
    """Weights from plugins: 3:1 becomes "mod 4 < 3"; weight 0 (draining)
    takes no new connections."""
    from dataclasses import replace

    from svcproxy.ir import Backend
    from svcproxy.plugins.nftables.rules import service_port_block

    plan = plan_of([node("node-a", ips=[NODE_IP]), svc1(), eps1("10.180.0.1", "10.180.0.2")])
    f = next(iter(plan))
    weighted = replace(f, backends=(Backend("10.180.0.1", 80, weight=3),
                                    Backend("10.180.0.2", 80, weight=1),
                                    Backend("10.180.0.3", 80, weight=0)))
    block = service_port_block([weighted], NftOptions())
    rules = block.chains["service-" + port_chain_base("ns1/svc1:p80", "tcp")][1]
    assert [r.split(" counter")[0] for r in rules] == [
        "meta l4proto tcp numgen random mod 4 < 3", "meta l4proto tcp"]


def test_an_endpoint_shared_by_two_services_stays_in_the_hairpin_set() -> None:
    p = Proxier()
    other = service("svc2", namespace="ns1", cluster_ip="172.30.0.42", ports=[TCP80])
    other_eps = slice_("svc2", namespace="ns1", ports=EP_PORTS,
                       endpoints=[endpoint("10.180.0.1", "node-a")])
    p.sync(svc1(), eps1("10.180.0.1"), other, other_eps, partial=False)
    p.sync(other, other_eps)
    assert p.elements("hairpin-endpoints") == {"10.180.0.1 . 10.180.0.1": ""}
    p.sync()
    assert p.elements("hairpin-endpoints") == {}


def test_no_endpoints_reject_and_local_policy_drop() -> None:
    """TestNoEndpointsReject / TestExternalTrafficPolicyLocal: without endpoints
    the ClusterIP and NodePort go to reject-chain; with endpoints elsewhere only
    and externalTrafficPolicy Local, the NodePort drops while the ClusterIP
    still serves."""
    p = Proxier()
    p.sync(svc1(type="NodePort", ports=[{**TCP80, "nodePort": 30080}]))
    assert p.elements("no-endpoint-services") == {"172.30.0.41 . tcp . 80": "goto reject-chain"}
    assert p.elements("no-endpoint-nodeports") == {"tcp . 30080": "goto reject-chain"}
    assert p.elements("service-ips") == {}
    p.sync(svc1(type="NodePort", externalTrafficPolicy="Local",
                ports=[{**TCP80, "nodePort": 30080}]),
           slice_("svc1", namespace="ns1", ports=EP_PORTS,
                  endpoints=[endpoint("10.180.0.2", "node-b")]))
    assert p.elements("no-endpoint-services") == {}
    assert p.elements("no-endpoint-nodeports") == {"tcp . 30080": "drop"}
    ext = "external-" + port_chain_base("ns1/svc1:p80", "tcp")
    assert p.elements("service-nodeports") == {"tcp . 30080": f"goto {ext}"}
    assert p.chain(ext)[0].endswith('comment "short-circuit pod traffic"')


def test_partial_sync_sends_only_the_change_and_lists_nothing() -> None:
    p = Proxier()
    other = service("svc2", namespace="ns1", cluster_ip="172.30.0.42", ports=[TCP80])
    other_eps = slice_("svc2", namespace="ns1", ports=EP_PORTS,
                       endpoints=[endpoint("10.180.1.1", "node-a")])
    p.sync(svc1(), eps1("10.180.0.1"), other, other_eps, partial=False)
    lists = p.kernel.lists
    p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2"), other, other_eps)
    assert p.kernel.lists == lists and p.kernel.transactions == 3  # (a new table: two)
    sent = p.kernel.texts[-1]
    assert "ns1/svc1/" in sent and "svc2" not in sent and "service-ips" not in sent
    p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2"), other, other_eps)
    assert p.kernel.transactions == 3  # nothing changed, nothing sent


def test_a_cluster_ip_shared_by_two_ports_stays_while_one_remains() -> None:
    two = [TCP80, {"name": "p81", "port": 81, "protocol": "TCP", "targetPort": 81}]
    p = Proxier()
    p.sync(svc1(ports=two), partial=False)
    assert p.elements("cluster-ips") == {"172.30.0.41": ""}
    p.sync(svc1(ports=two[:1]))
    assert p.elements("cluster-ips") == {"172.30.0.41": ""}
    p.sync()
    assert p.elements("cluster-ips") == {}


def test_refused_transaction_changes_nothing_and_the_next_sync_repairs() -> None:
    p = Proxier()
    p.sync(svc1(), eps1("10.180.0.1"), partial=False)
    before = p.kernel.list_table()
    p.kernel.refuse = "10.180.0.2"
    with pytest.raises(KernelError, match="refused"):
        p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2"))
    assert p.kernel.list_table() == before  # all or nothing
    assert not p.state.known
    p.kernel.refuse = None
    lists = p.kernel.lists
    p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2"))  # the store reads the kernel back
    assert p.kernel.lists == lists + 1
    svc = "service-" + port_chain_base("ns1/svc1:p80", "tcp")
    assert len(p.chain(svc)) == 2


@pytest.mark.parametrize("partial", [False, True])
def test_affinity_timeout_change_redeclares_the_sets_in_one_transaction(partial: bool) -> None:
    """A set cannot be changed in place: it is deleted and added again, and
    every chain naming it is rewritten in the same transaction (the fake, like
    the kernel, refuses to delete a set a rule still names), in a full sync
    and in a partial one (the store has only digests of the chains: their
    text comes from the rendering)."""
    p = Proxier()
    sticky = {"sessionAffinity": "ClientIP",
              "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    p.sync(svc1(**sticky), eps1("10.180.0.1", "10.180.0.2"), partial=False)
    aff = "affinity-" + endpoint_base("ns1/svc1:p80", "tcp", "10.180.0.1", 80)
    assert p.kernel.table is not None
    assert "timeout 1m" in p.kernel.table.sets[aff].header
    sticky["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 120}}
    p.sync(svc1(**sticky), eps1("10.180.0.1", "10.180.0.2"), partial=partial)
    assert "timeout 2m" in p.kernel.table.sets[aff].header
    p.sync(svc1(), eps1("10.180.0.1", "10.180.0.2"))
    assert not [s for s in p.kernel.table.sets if s.startswith("affinity-")]


def test_stale_chains_wait_a_second_before_deletion() -> None:
    p = Proxier()
    p.sync(svc1(), eps1("10.180.0.1"), partial=False)
    result = p.sync()
    assert result.followup and result.chains_flushed == 1
    assert p.kernel.table is not None
    assert all(not c.rules for n, c in p.kernel.table.chains.items() if "/" in n)
    p.now += 0.5
    assert p.sync().chains_deleted == 0
    p.now += 1
    result = p.sync()
    assert result.chains_deleted == 1 and not result.followup
    assert not [n for n in p.kernel.table.chains if "/" in n]


def test_a_chain_back_in_use_before_deletion_is_kept() -> None:
    p = Proxier()
    p.sync(svc1(), eps1("10.180.0.1"), partial=False)
    p.sync()
    p.sync(svc1(), eps1("10.180.0.1"))
    p.now += 5
    result = p.sync(svc1(), eps1("10.180.0.1"))
    assert result.chains_deleted == 0 and not result.followup
    svc = "service-" + port_chain_base("ns1/svc1:p80", "tcp")
    assert len(p.chain(svc)) == 1


def test_full_sync_after_restart_adopts_the_table() -> None:
    """A fresh state (svcproxy restarted) reads what the last one wrote and
    changes nothing."""
    p = Proxier()
    p.sync(svc1(type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/25"],
                status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
           eps1("10.180.0.1"), partial=False)
    transactions = p.kernel.transactions
    fresh = FamilyState(p.kernel)  # type: ignore[arg-type]
    result = sync_family(fresh, p.plan, None, p.opts)
    assert result.changes == 0 and p.kernel.transactions == transactions
    fw = "firewall-" + port_chain_base("ns1/svc1:p80", "tcp")
    assert p.chain(fw) == ("ip saddr != 203.0.113.0/25 drop",)


def test_full_sync_lists_the_table_only_when_someone_else_committed() -> None:
    """The ruleset generation moves with every commit in the namespace: when
    every commit since the plugin last read or wrote was its own, the table is
    what the stores say and a full sync does not list it; one commit by anybody
    else, and it does. (The plugin on fake doors; nothing of the host's kernel
    is asked: no IPv6, no other datapath to retire.)"""
    from svcproxy.ir import PlanDelta
    from svcproxy.plugins.nftables import NftablesPlugin

    plugin = NftablesPlugin()
    kernel = FakeNft()
    plugin.families[4] = FamilyState(kernel)  # type: ignore[arg-type]
    plugin.unusable[6] = "not in this test"
    plugin.retired, plugin.ipvs_left = True, 0
    plan = plan_of([node("node-a", ips=[NODE_IP]), svc1(), eps1("10.180.0.1")])

    def full() -> dict[str, Any]:
        result = plugin.svcproxy_apply_plan("nftables", plan, PlanDelta(), True)
        assert result is not None
        return result.details["ipv4"]  # type: ignore[no-any-return]

    assert full()["listed"] and kernel.lists == 1  # first: read, then write
    assert not full()["listed"] and kernel.lists == 1  # nobody else committed
    kernel.gen += 1  # another program committed something
    again = full()
    assert again["listed"] and kernel.lists == 2 and again["chains_written"] == 0
    assert not full()["listed"]
