"""The IPVS helper ipsets and iptables rules reconciled against fakes of the
ipset and iptables doors: kube-proxy's ipset cases from proxier_test.go
(TestLoadBalancerSourceRanges, TestOnlyLocalLoadBalancing, TestNodePort,
TestHealthCheckNodePort, TestMasqueradeRule ...), ported, and the reconciler's
own rules (only the net difference, nothing written without a change, a
refused write read back). tests/host runs the same reconciler against the
host kernel's ipset and iptables."""

from __future__ import annotations

from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_

from svcproxy.ir import ServiceMap
from svcproxy.plugins.ipvs.helper_state import HelperState
from svcproxy.plugins.ipvs.helpers import JUMPS, HelperOptions
from svcproxy.plugins.kernel.fakes import FakeIpset, FakeIptables

NODE_IP = "192.168.1.10"
TCP80 = {"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 8080}
EP_PORTS = [{"name": "p80", "port": 8080, "protocol": "TCP"}]
OPTS = HelperOptions(family=4, node_ip=NODE_IP, local_detector=("-s", "10.244.0.0/16"))


class Helpers:
    def __init__(self, opts: HelperOptions = OPTS) -> None:
        self.ipset = FakeIpset()
        self.ipt = FakeIptables()
        self.state = HelperState(self.ipset, self.ipt, 4)
        self.opts = opts
        self.plan = ServiceMap()

    def sync(self, *objects: dict[str, Any], partial: bool = False) -> int:
        plan = plan_of([node("node-a", ips=[NODE_IP]), *objects])
        changed = None
        if partial:
            keys = set(plan.frontends) | set(self.plan.frontends)
            changed = {k for k in keys if plan.frontends.get(k) != self.plan.frontends.get(k)}
        written = self.state.sync(plan, changed, self.opts)
        self.plan = plan
        return written

    def members(self, name: str) -> set[str]:
        return self.ipset.sets[name]

    def rules(self, table: str, chain: str) -> tuple[str, ...]:
        return self.ipt.chains[(table, chain)]


def lb(**spec: Any) -> dict[str, Any]:
    return service("svc1", cluster_ip="10.20.30.41", type="LoadBalancer",
                   ports=[{**TCP80, "nodePort": 30001}],
                   status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}, **spec)


EPS = slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a"),
                                endpoint("10.180.1.1", "node-b")], ports=EP_PORTS)


def test_load_balancer_source_ranges() -> None:
    """TestLoadBalancerSourceRanges: the LB entry, its -FW entry and one
    SOURCE-CIDR entry per range; the firewall chain drops the rest."""
    h = Helpers()
    h.sync(lb(loadBalancerSourceRanges=["1.2.3.0/28", "192.168.1.0/24"]), EPS)
    assert h.members("KUBE-LOAD-BALANCER") == {"1.2.3.4,tcp:80"}
    assert h.members("KUBE-LOAD-BALANCER-FW") == {"1.2.3.4,tcp:80"}
    assert h.members("KUBE-LOAD-BALANCER-SOURCE-CIDR") == {"1.2.3.4,tcp:80,1.2.3.0/28",
                                                           "1.2.3.4,tcp:80,192.168.1.0/24"}
    # the node is inside a range: it may reach the LB IP itself
    assert h.members("KUBE-LOAD-BALANCER-SOURCE-IP") == {"1.2.3.4,tcp:80,1.2.3.4"}
    assert h.rules("filter", "KUBE-SOURCE-RANGES-FIREWALL")[-1] == \
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP"
    assert any("KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL" in r
               for r in h.rules("filter", "KUBE-PROXY-FIREWALL"))


def test_only_local_load_balancing() -> None:
    """TestOnlyLocalLoadBalancing: externalTrafficPolicy Local puts the LB entry
    in KUBE-LOAD-BALANCER-LOCAL (no masquerade) and the NodePort in the
    -LOCAL-TCP set, with the local endpoint in KUBE-LOOP-BACK."""
    h = Helpers()
    h.sync(lb(externalTrafficPolicy="Local", healthCheckNodePort=32000), EPS)
    assert h.members("KUBE-LOAD-BALANCER-LOCAL") == {"1.2.3.4,tcp:80"}
    assert h.members("KUBE-NODE-PORT-LOCAL-TCP") == {"30001"}
    assert h.members("KUBE-LOOP-BACK") == {"10.180.0.1,tcp:8080,10.180.0.1"}
    assert h.rules("nat", "KUBE-LOAD-BALANCER")[0].endswith(
        "--match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN")


def test_node_port() -> None:
    """TestNodePort: KUBE-NODE-PORT-TCP/-UDP hold the ports; the nat
    KUBE-NODE-PORT chain masquerades them."""
    h = Helpers()
    h.sync(service("svc1", cluster_ip="10.20.30.41", type="NodePort",
                   ports=[{**TCP80, "nodePort": 30001},
                          {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53,
                           "nodePort": 30053}]))
    assert h.members("KUBE-NODE-PORT-TCP") == {"30001"}
    assert h.members("KUBE-NODE-PORT-UDP") == {"30053"}
    assert h.members("KUBE-CLUSTER-IP") == {"10.20.30.41,tcp:80", "10.20.30.41,udp:53"}
    np = h.rules("nat", "KUBE-NODE-PORT")
    assert any("KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in r for r in np)


def test_health_check_node_port() -> None:
    """TestHealthCheckNodePort: the port is in KUBE-HEALTH-CHECK-NODE-PORT (the
    filter chain accepts it), and leaves with the Service."""
    h = Helpers()
    h.sync(lb(externalTrafficPolicy="Local", healthCheckNodePort=30100), EPS)
    assert h.members("KUBE-HEALTH-CHECK-NODE-PORT") == {"30100"}
    h.sync(partial=True)
    assert h.members("KUBE-HEALTH-CHECK-NODE-PORT") == set()


@pytest.mark.parametrize(("opts", "expected"), [
    (HelperOptions(family=4, masquerade_all=True),
     '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
     'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ'),
    (HelperOptions(family=4, local_detector=("-s", "10.244.0.0/16")),
     '-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service cluster '
     'ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst '
     '-j KUBE-MARK-MASQ'),
    (HelperOptions(family=4, local_detector=("-i", "veth+")),
     '-A KUBE-SERVICES ! -i veth+ -m comment --comment "Kubernetes service cluster ip + port '
     'for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ'),
])
def test_masquerade_rule(opts: HelperOptions, expected: str) -> None:
    """TestMasqueradeRule and the detect-local modes: who gets masqueraded on
    the way to a ClusterIP."""
    h = Helpers(opts)
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    assert expected in h.rules("nat", "KUBE-SERVICES")


def test_jumps_are_written_once_and_others_rules_stay() -> None:
    h = Helpers()
    h.ipt.chains[("filter", "FORWARD")] = ("-A FORWARD -j OTHER",)
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    for table, chain, body in JUMPS:
        assert h.rules(table, chain).count(f"-A {chain} {body}") == 1
    assert "-A FORWARD -j OTHER" in h.rules("filter", "FORWARD")
    restores, writes = h.ipt.restores, len(h.ipset.writes)
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)  # full, no change
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS, partial=True)
    assert (h.ipt.restores, len(h.ipset.writes)) == (restores, writes)


def test_only_the_net_difference_is_written() -> None:
    h = Helpers()
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    before = len(h.ipset.writes)
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]),
           slice_("svc1", endpoints=[endpoint("10.180.0.1", "node-a"),
                                     endpoint("10.180.0.2", "node-a")], ports=EP_PORTS),
           partial=True)
    assert h.ipset.writes[before:] == [("add", "KUBE-LOOP-BACK",
                                        "10.180.0.2,tcp:8080,10.180.0.2")]


def test_a_refused_member_is_reported_and_the_sets_read_back() -> None:
    """A set that refuses a member (at maxelem, say): the rest of the sync is
    written, the refusal is reported naming the set, the member and the
    Service it is for, that member becomes unknown, and the next sync reads
    the sets back and converges once the set takes it."""
    h = Helpers()
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    h.ipset.refuse = {("KUBE-CLUSTER-IP", "10.20.30.42,tcp:80")}
    two = (service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS,
           service("svc2", cluster_ip="10.20.30.42", ports=[TCP80]))
    h.sync(*two, partial=True)
    assert h.state.refused == [
        "ipset KUBE-CLUSTER-IP: cannot add 10.20.30.42,tcp:80 (Service default/svc2:p80): "
        "the set is full (its maxelem is reached; kube-proxy's sets hold 65536)"]
    # everything else of the sync went in: the VIP's other set, the rules
    assert "10.20.30.42" in h.members("KUBE-IPVS-IPS")
    assert h.members("KUBE-CLUSTER-IP") == {"10.20.30.41,tcp:80"}
    assert not h.state.members.known
    assert h.state.members.unknown() == {("KUBE-CLUSTER-IP", "10.20.30.42,tcp:80")}
    h.ipset.refuse = set()
    h.plan = ServiceMap()  # as the core: the failed plan was not adopted; next is full
    h.sync(*two)
    assert h.state.refused == []
    assert h.members("KUBE-CLUSTER-IP") == {"10.20.30.41,tcp:80", "10.20.30.42,tcp:80"}
    assert h.state.members.known


def test_drift_in_sets_and_chains_is_repaired_by_a_full_sync() -> None:
    h = Helpers()
    objects = (service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    h.sync(*objects)
    h.ipset.sets["KUBE-CLUSTER-IP"].clear()
    h.ipset.sets["KUBE-CLUSTER-IP"].add("10.9.9.9,tcp:1")
    h.ipt.chains[("nat", "KUBE-SERVICES")] = ()
    h.sync(*objects, partial=True)  # trusts its memory
    assert h.members("KUBE-CLUSTER-IP") == {"10.9.9.9,tcp:1"}
    h.sync(*objects)
    assert h.members("KUBE-CLUSTER-IP") == {"10.20.30.41,tcp:80"}
    assert h.rules("nat", "KUBE-SERVICES")


def test_cleanup_removes_the_chains_jumps_and_sets() -> None:
    h = Helpers()
    h.ipset.sets["OTHER"] = {"x"}
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    lines = HelperState(h.ipset, h.ipt, 4).cleanup()
    assert any("jump rules" in line for line in lines)
    assert set(h.ipset.sets) == {"OTHER"}
    assert not any(c.startswith("KUBE-") for _, c in h.ipt.chains)
    assert all(not rules for rules in h.ipt.chains.values())


def test_cleanup_names_a_set_the_kernel_keeps_and_removes_the_rest() -> None:
    """A helper set someone else's rule still uses cannot be destroyed: cleanup
    says which and why, and removes every other set (they go in one batch)."""
    h = Helpers()
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    ours = {n for n in h.ipset.sets if n.startswith("KUBE-")}
    h.ipset.referenced = {"KUBE-CLUSTER-IP"}
    lines = HelperState(h.ipset, h.ipt, 4).cleanup()
    assert set(h.ipset.sets) == {"KUBE-CLUSTER-IP"}
    assert f"ipvs: removed {len(ours) - 1} ipsets (IPv4)" in lines
    assert "ipvs: ipset KUBE-CLUSTER-IP not removed: the set is in use" in lines


def test_ipv6_sets_with_truncated_names_survive_partial_syncs() -> None:
    """KUBE-6-LOAD-BALANCER-SOURCE-CIDR is 32 characters, one over ipset's
    limit: its members are kept through a partial sync that does not touch
    them, and written through one that does (the set name is not turned back
    into its base name by swapping the prefix, which the truncation breaks)."""
    h = Helpers(HelperOptions(family=6, node_ip="fd00::10"))
    h.state = HelperState(h.ipset, h.ipt, 6)
    lb6 = service("lb", cluster_ip="fd00:96::5", ipFamilies=["IPv6"], type="LoadBalancer",
                  ports=[{**TCP80, "nodePort": 30001}],
                  loadBalancerSourceRanges=["2001:db8::/64"],
                  status={"loadBalancer": {"ingress": [{"ip": "fd00:1::7"}]}})
    eps = slice_("lb", endpoints=[endpoint("fd00:244::1", "node-a")], ports=EP_PORTS,
                 address_type="IPv6")
    h.sync(lb6, eps)
    cidr = "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert h.members(cidr) == {"fd00:1::7,tcp:80,2001:db8::/64"}
    other = service("web", cluster_ip="fd00:96::9", ipFamilies=["IPv6"], ports=[TCP80])
    h.sync(lb6, eps, other, partial=True)
    assert h.members(cidr) == {"fd00:1::7,tcp:80,2001:db8::/64"}
    moved = {**lb6, "spec": {**lb6["spec"], "loadBalancerSourceRanges": ["2001:db8:1::/64"]}}
    h.sync(moved, eps, other, partial=True)
    assert h.members(cidr) == {"fd00:1::7,tcp:80,2001:db8:1::/64"}


def test_iptables_mode_leftovers_go_after_the_ipvs_sync_and_nothing_else() -> None:
    """A node taken over from kube-proxy's iptables mode: once the IPVS datapath
    serves, iptables mode's own chains and jumps are removed; the chains both
    modes share are IPVS mode's by then, and a chain of someone else's stays."""
    h = Helpers()
    ipt = h.ipt.chains
    ipt[("nat", "KUBE-SVC-ABC")] = ("-A KUBE-SVC-ABC -j KUBE-SEP-DEF",)
    ipt[("nat", "KUBE-SEP-DEF")] = ("-A KUBE-SEP-DEF -p tcp -m tcp -j DNAT --to-destination "
                                    "10.180.0.1:8080",)
    ipt[("nat", "KUBE-NODEPORTS")] = ()
    ipt[("nat", "KUBE-SERVICES")] = ("-A KUBE-SERVICES -d 10.20.30.41/32 -j KUBE-SVC-ABC",)
    ipt[("filter", "KUBE-SERVICES")] = ("-A KUBE-SERVICES -d 10.20.30.42/32 -j REJECT",)
    ipt[("filter", "KUBE-EXTERNAL-SERVICES")] = ()
    ipt[("filter", "KUBE-NODEPORTS")] = ()
    ipt[("filter", "CALICO-INPUT")] = ("-A CALICO-INPUT -j ACCEPT",)
    iptables_mode_jump = ('-A FORWARD -m conntrack --ctstate NEW -m comment --comment '
                          '"kubernetes service portals" -j KUBE-SERVICES')
    ipt[("filter", "FORWARD")] = (iptables_mode_jump, "-A FORWARD -j CALICO-INPUT")
    h.sync(service("svc1", cluster_ip="10.20.30.41", ports=[TCP80]), EPS)
    removed = h.state.remove_iptables_mode()
    assert removed == 6 + 1  # six chains, one jump
    left = h.ipt.chains
    for chain in (("nat", "KUBE-SVC-ABC"), ("nat", "KUBE-SEP-DEF"), ("nat", "KUBE-NODEPORTS"),
                  ("filter", "KUBE-SERVICES"), ("filter", "KUBE-EXTERNAL-SERVICES"),
                  ("filter", "KUBE-NODEPORTS")):
        assert chain not in left
    assert iptables_mode_jump not in left[("filter", "FORWARD")]
    assert "-A FORWARD -j CALICO-INPUT" in left[("filter", "FORWARD")]
    assert left[("filter", "CALICO-INPUT")] == ("-A CALICO-INPUT -j ACCEPT",)
    # IPVS mode's KUBE-SERVICES, not iptables mode's
    assert not any("KUBE-SVC-" in r for r in left[("nat", "KUBE-SERVICES")])
    assert h.state.remove_iptables_mode() == 0
