"""kube-proxy IPVS mode's ipsets and helper rules, rendered from the plan."""

from __future__ import annotations

from factories import endpoint, node, plan_of, service, slice_

from svcproxy.plugins.ipvs.datapath import render_ipvsadm, to_ipvs
from svcproxy.plugins.ipvs.helpers import (
    HelperOptions,
    helper_chains,
    ipset_restore,
    parse_ipset_save,
    set_entries,
    set_name,
)
from svcproxy.plugins.ipvs.netlink import F_PERSISTENT, F_SCHED1

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
    assert chains[("nat", "KUBE-POSTROUTING")][0].endswith(
        "--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE")
    assert chains[("filter", "KUBE-IPVS-OUT-FILTER")] == (
        "-A KUBE-IPVS-OUT-FILTER -s 198.51.100.7/32 -m ipvs --vaddr 198.51.100.7/32 "
        "--vproto tcp --vport 80 -j DROP",)
    assert chains[("filter", "KUBE-SOURCE-RANGES-FIREWALL")][-1] == \
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP"
    assert not any("INVALID" in r for r in chains[("filter", "KUBE-FORWARD")])
    assert chains[("filter", "KUBE-IPVS-FILTER")][-1].endswith(
        "-m set --match-set KUBE-IPVS-IPS dst -j REJECT --reject-with icmp-port-unreachable")


def test_ipv6_set_names_and_restore_diff() -> None:
    assert set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", 6) == "KUBE-6-LOAD-BALANCER-SOURCE-CIDR"[:31]
    text = ipset_restore({"KUBE-CLUSTER-IP": {"10.96.0.1,tcp:443", "10.96.0.2,tcp:80"}},
                         {"KUBE-CLUSTER-IP": {"10.96.0.2,tcp:80", "10.96.0.9,udp:53"}}, 4)
    assert text.splitlines() == [
        "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 -exist",
        "add KUBE-CLUSTER-IP 10.96.0.1,tcp:443 -exist",
        "del KUBE-CLUSTER-IP 10.96.0.9,udp:53 -exist"]
    saved = parse_ipset_save("create KUBE-X hash:ip family inet\nadd KUBE-X 10.0.0.1\n")
    assert saved == {"KUBE-X": {"10.0.0.1"}}


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
