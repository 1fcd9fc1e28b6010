"""kube-proxy IPVS mode's ipsets and helper rules, rendered from the plan."""

from __future__ import annotations

from factories import endpoint, node, plan_of, service, slice_
from hypothesis import given
from hypothesis import strategies as st

from svcproxy.ir import FrontendKey
from svcproxy.plugins.ipvs.helpers import (
    HelperOptions,
    SetIndex,
    frontend_entries,
    helper_chains,
    ipset_create,
    net_changes,
    set_entries,
    set_name,
)
from svcproxy.plugins.ipvs.servers import render_ipvsadm, to_ipvs
from svcproxy.plugins.kernel.ipvs import F_PERSISTENT, F_SCHED1

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def example() -> tuple[dict, list, dict]:  # type: ignore[type-arg]
    plan = plan_of([
        node("node-a", ips=["192.168.1.10"]),
        service("lb", cluster_ip="10.96.0.5", type="LoadBalancer", externalTrafficPolicy="Local",
                healthCheckNodePort=32000, ports=[{**HTTP[0], "nodePort": 30080}],
                loadBalancerSourceRanges=["203.0.113.0/24"],
                status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}),
        slice_("lb", endpoints=[endpoint("10.244.1.5", "node-a"), endpoint("10.244.2.5")],
               ports=[{"name": "http", "port": 8080}]),
    ])
    entries, out_filter = set_entries(plan, {"10.96.0.5", "198.51.100.7"}, 4, "192.168.1.10")
    chains = helper_chains(entries, out_filter, HelperOptions(
        local_detector=("-s", "10.244.0.0/16"), node_ip="192.168.1.10"))
    return entries, out_filter, chains


def test_set_entries() -> None:
    entries, out_filter, _ = example()
    assert entries["KUBE-CLUSTER-IP"] == {"10.96.0.5,tcp:80"}
    assert entries["KUBE-LOAD-BALANCER"] == entries["KUBE-LOAD-BALANCER-LOCAL"] == \
        entries["KUBE-LOAD-BALANCER-FW"] == {"198.51.100.7,tcp:80"}
    assert entries["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == {"198.51.100.7,tcp:80,203.0.113.0/24"}
    assert entries["KUBE-LOAD-BALANCER-SOURCE-IP"] == set()  # the node is not in the range
    assert out_filter == [("198.51.100.7", "tcp", 80)]
    assert entries["KUBE-NODE-PORT-TCP"] == entries["KUBE-NODE-PORT-LOCAL-TCP"] == {"30080"}
    assert entries["KUBE-HEALTH-CHECK-NODE-PORT"] == {"32000"}
    assert entries["KUBE-LOOP-BACK"] == {"10.244.1.5,tcp:8080,10.244.1.5"}
    assert entries["KUBE-IPVS-IPS"] == {"10.96.0.5", "198.51.100.7"}


def test_rules_match_kube_proxy() -> None:
    _, _, chains = example()
    svc = chains[("nat", "KUBE-SERVICES")]
    assert svc[0] == "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"
    assert ('-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service '
            'cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP '
            'dst,dst -j KUBE-MARK-MASQ') in svc
    assert svc[-3].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    assert chains[("nat", "KUBE-NODE-PORT")][0].startswith(
        "-A KUBE-NODE-PORT -p tcp -m comment --comment")
    assert chains[("nat", "KUBE-NODE-PORT")][0].endswith(
        "--match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN")
    assert chains[("nat", "KUBE-POSTROUTING")][0] == (
        '-A KUBE-POSTROUTING -m comment --comment "svcproxy: node traffic from a service VIP" '
        '-m set --match-set KUBE-IPVS-IPS src -j MASQUERADE')
    assert chains[("nat", "KUBE-POSTROUTING")][1].endswith(
        "--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE")
    assert chains[("filter", "KUBE-IPVS-OUT-FILTER")] == (
        "-A KUBE-IPVS-OUT-FILTER -s 198.51.100.7/32 -m ipvs --vaddr 198.51.100.7/32 "
        "--vproto tcp --vport 80 -j DROP",)
    assert chains[("filter", "KUBE-SOURCE-RANGES-FIREWALL")][-1] == \
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP"
    assert not any("INVALID" in r for r in chains[("filter", "KUBE-FORWARD")])
    assert chains[("filter", "KUBE-IPVS-FILTER")][-1].endswith(
        "-m set --match-set KUBE-IPVS-IPS dst -j REJECT --reject-with icmp-port-unreachable")


def test_ipv6_set_names_and_set_creation() -> None:
    assert set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", 6) == "KUBE-6-LOAD-BALANCER-SOURCE-CIDR"[:31]
    assert ipset_create(["KUBE-CLUSTER-IP", "KUBE-NODE-PORT-TCP"], 4).splitlines() == [
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 -exist",
        "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 -exist"]
    assert ipset_create([set_name("KUBE-LOOP-BACK", 6)], 6) == (
        "create KUBE-6-LOOP-BACK hash:ip,port,ip family inet6 hashsize 1024 maxelem 65536 "
        "-exist\n")
    # a truncated name keeps its type (it was created as hash:ip,port)
    assert ipset_create([set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", 6)], 6) == (
        "create KUBE-6-LOAD-BALANCER-SOURCE-CID hash:ip,port,net family inet6 hashsize 1024 "
        "maxelem 65536 -exist\n")


def test_virtual_servers_from_frontends() -> None:
    plan = plan_of([node("node-a", ips=["192.168.1.10"]),
                    service("s", cluster_ip="10.96.0.1", sessionAffinity="ClientIP",
                            type="NodePort", externalTrafficPolicy="Local",
                            ports=[{**HTTP[0], "nodePort": 30080}]),
                    slice_("s", endpoints=[endpoint("10.244.2.5", "node-b")],
                           ports=[{"name": "http", "port": 8080}])],
                   "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                   "kind: KubeProxyConfiguration\nipvs: {scheduler: mh}\n")
    table = dict(to_ipvs(fe) for fe in plan.frontends.values())
    vs = next(v for v in table if v.port == 30080)
    assert vs.flags == F_PERSISTENT | F_SCHED1 and vs.timeout == 10800  # mh-fallback, always
    # Local policy without local endpoints: IPVS falls back to the cluster ones
    assert [r.address for r in table[vs].values()] == ["10.244.2.5"]
    text = render_ipvsadm({v: list(r.values()) for v, r in table.items()})
    assert "-A -t 192.168.1.10:30080 -s mh -b mh-fallback -p 10800" in text


def test_set_index_follows_changes_like_a_full_recompute() -> None:
    """Partial updates of the changed frontends give the same members as
    computing every set again; a member two frontends share (the NodePort on
    each node address) stays until the last one goes."""
    nodes = node("node-a", ips=["192.168.1.10", "192.168.1.11"])

    def cluster(lb_ports: list[int], local: bool) -> list:  # type: ignore[type-arg]
        objs = [nodes]
        for i, np in enumerate(lb_ports):
            objs += [service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}", type="NodePort",
                             externalTrafficPolicy="Local" if local else "Cluster",
                             ports=[{**HTTP[0], "nodePort": np}]),
                     slice_(f"s{i}", endpoints=[endpoint(f"10.244.1.{i + 1}", "node-a")],
                            ports=[{"name": "http", "port": 8080}])]
        return objs

    def full(plan) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
        return set_entries(plan, {fe.address for fe in plan.frontends.values()
                                  if fe.bind_address}, 4, None)[0]

    before = plan_of(cluster([30080, 30081], False))
    after = plan_of(cluster([30081, 30082, 30083], True))
    index = SetIndex()
    sink: list[tuple[str, str]] = []
    for fe in before.frontends.values():
        index.set(fe.key, *frontend_entries(fe, None, fe.bind_address), sink, sink)
    added: list[tuple[str, str]] = []
    removed: list[tuple[str, str]] = []
    changed = set(before.frontends) | set(after.frontends)
    for key in changed:
        fe = after.frontends.get(key)
        if fe is None:
            index.set(key, (), None, added, removed)
        else:
            index.set(key, *frontend_entries(fe, None, fe.bind_address), added, removed)
    members = index.members()
    expected = full(after)
    for name, want in expected.items():
        if name != "KUBE-HEALTH-CHECK-NODE-PORT":
            assert members[name] == want, name
    assert ("KUBE-NODE-PORT-TCP", "30080") in removed
    assert ("KUBE-NODE-PORT-TCP", "30081") not in removed + added  # kept throughout
    assert ("KUBE-NODE-PORT-LOCAL-TCP", "30083") in added
    assert sum(1 for e in added if e == ("KUBE-NODE-PORT-TCP", "30082")) == 1


def test_scheduler_annotation_sets_scheduler_and_flags() -> None:
    def plan(annotations: dict[str, str]):  # type: ignore[no-untyped-def]
        return plan_of([service("s", cluster_ip="10.96.0.1", ports=HTTP,
                                annotations=annotations)])

    fe = next(iter(plan({"svcproxy.io/ipvs-scheduler": "sh",
                         "svcproxy.io/ipvs-scheduler-flags": "sh-fallback, sh-port"})
                   .frontends.values()))
    assert (fe.scheduler, fe.scheduler_flags) == ("sh", ("sh-fallback", "sh-port"))
    vs, _ = to_ipvs(fe)
    assert render_ipvsadm({vs: []}) == "-A -t 10.96.0.1:80 -s sh -b sh-fallback,sh-port\n"


def test_bad_scheduler_annotation_is_reported_and_ignored(caplog) -> None:  # type: ignore[no-untyped-def]
    plan = plan_of([service("s", cluster_ip="10.96.0.1", ports=HTTP,
                            annotations={"svcproxy.io/ipvs-scheduler": "fastest"}),
                    service("t", cluster_ip="10.96.0.2", ports=HTTP,
                            annotations={"svcproxy.io/ipvs-scheduler": "wrr",
                                         "svcproxy.io/ipvs-scheduler-flags": "mh-port"})])
    by_ip = {fe.address: fe for fe in plan.frontends.values()}
    assert by_ip["10.96.0.1"].scheduler == "rr"  # the configured one
    assert (by_ip["10.96.0.2"].scheduler, by_ip["10.96.0.2"].scheduler_flags) == ("wrr", ())
    assert "Service default/s: annotation svcproxy.io/ipvs-scheduler: unknown scheduler " \
        "'fastest' (one of rr, wrr" in caplog.text
    assert "flag 'mh-port' is not valid with scheduler wrr (valid: flag-1, flag-2, flag-3)" \
        in caplog.text


def test_reports_reach_sources_once() -> None:
    from svcproxy import hookimpl
    from svcproxy.config import parse_config
    from svcproxy.manager import PluginHost

    seen: list[tuple[str, ...]] = []

    class Source:
        @hookimpl
        def svcproxy_report_object(self, kind: str, namespace: str, name: str, reason: str,
                                   message: str) -> None:
            seen.append((kind, namespace, name, reason))

    host = PluginHost(parse_config("", "t.yaml"), extra_plugins=[("source", Source())])
    host.configure()
    for _ in range(3):
        host.report_object("Service", "ns", "s", "InvalidIPVSScheduler", "bad")
    assert seen == [("Service", "ns", "s", "InvalidIPVSScheduler")]


def test_a_member_a_frontend_keeps_is_neither_added_nor_removed() -> None:
    """Regression: a member present before and after a frontend's change (its
    VIP:port when one endpoint goes) was in both lists, and the writer's add
    then delete left it deleted."""
    index = SetIndex()
    key = FrontendKey("10.96.0.10", 80, "TCP")
    sink: list[tuple[str, str]] = []
    index.set(key, (("KUBE-CLUSTER-IP", "10.96.0.10,tcp:80"),
                    ("KUBE-LOOP-BACK", "10.244.1.1,tcp:8080,10.244.1.1")), None, sink, sink)
    added: list[tuple[str, str]] = []
    removed: list[tuple[str, str]] = []
    index.set(key, (("KUBE-CLUSTER-IP", "10.96.0.10,tcp:80"),), None, added, removed)
    assert added == []
    assert removed == [("KUBE-LOOP-BACK", "10.244.1.1,tcp:8080,10.244.1.1")]


def test_net_changes_keeps_a_member_that_moved_between_frontends() -> None:
    a, b = FrontendKey("10.96.0.10", 80, "TCP"), FrontendKey("10.96.0.11", 80, "TCP")
    member = ("KUBE-NODE-PORT-TCP", "30080")
    for first, second in ((a, b), (b, a)):
        index = SetIndex()
        sink: list[tuple[str, str]] = []
        index.set(first, (member,), None, sink, sink)
        added: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []
        index.set(first, (), None, added, removed)  # given up ...
        index.set(second, (member,), None, added, removed)  # ... and taken
        assert net_changes(added, removed) == ([], [])
        assert index.members()["KUBE-NODE-PORT-TCP"] == {"30080"}


MEMBERS = st.sampled_from([("KUBE-CLUSTER-IP", f"10.96.0.{i},tcp:80") for i in range(4)]
                          + [("KUBE-NODE-PORT-TCP", str(30000 + i)) for i in range(3)])
KEYS = st.sampled_from([FrontendKey(f"10.96.1.{i}", 80, "TCP") for i in range(4)])


@given(st.lists(st.lists(st.tuples(KEYS, st.lists(MEMBERS, max_size=4).map(tuple)),
                         max_size=5), max_size=6))
def test_net_changes_applied_to_the_kernel_give_the_index(syncs: list) -> None:  # type: ignore[type-arg]
    """Any sequence of syncs, each changing several frontends: a kernel set that
    receives only the net adds and deletes always equals the index's members,
    and no member is both added and deleted in one sync."""
    index = SetIndex()
    kernel: set[tuple[str, str]] = set()
    for sync in syncs:
        added: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []
        for key, entries in sync:
            index.set(key, entries, None, added, removed)
        adds, dels = net_changes(added, removed)
        assert not set(adds) & set(dels)
        assert not set(adds) & kernel and set(dels) <= kernel  # only real changes
        kernel = (kernel | set(adds)) - set(dels)
        assert kernel == set(index.refs)
