"""kube-proxy's iptables layout rendered from the IR (no kernel needed)."""

from __future__ import annotations

from dataclasses import replace

from factories import endpoint, node, plan_of, service, slice_

from svcproxy.ir import ServiceMap
from svcproxy.plugins.iptables import rule_options
from svcproxy.plugins.iptables.datapath import (
    SHARED,
    desired_ruleset,
    jumps_for,
    render_service_ports,
    restore_text,
)
from svcproxy.plugins.iptables.rules import (
    FIREWALL,
    LOCALNET_FILTER,
    RuleOptions,
    chain_suffix,
    endpoint_chain,
    is_owned,
    probability,
)

HTTP = [{"name": "p80", "port": 80, "protocol": "TCP", "targetPort": 8080}]
OPTS = RuleOptions(local_detector=("-s", "10.0.0.0/8"))


def test_chain_names_match_kube_proxy() -> None:
    # vectors from kube-proxy's own tests
    assert chain_suffix("ns1/svc1:p80", "tcp") == "XPGD46QRK7WJZT7O"
    assert chain_suffix("ns1/svc1", "TCP") == "AQI2S6QIMU7PVVRP"
    assert endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_probability_is_what_iptables_save_prints() -> None:
    assert probability(1 / 3) == "0.33333333349"
    assert probability(1 / 2) == "0.50000000000"
    assert probability(1 / 4) == "0.25000000000"


def rules_of(objs: list[dict], opts: RuleOptions = OPTS) -> dict:  # type: ignore[type-arg]
    plan = plan_of(objs, "", "node-a").for_family(4)
    opts = replace(opts, node_ip=plan.primary_ip(4))
    return desired_ruleset(render_service_ports(plan, None, opts), opts)


def chain(rules: dict, table: str, name: str) -> list[str]:  # type: ignore[type-arg]
    return list(rules[(table, name)])


def test_cluster_ip_with_endpoints() -> None:
    r = rules_of([service("svc1", "ns1", cluster_ip="172.30.0.41", ports=HTTP),
                  slice_("svc1", "ns1", endpoints=[endpoint("10.180.0.1"), endpoint("10.180.0.2"),
                                                   endpoint("10.180.0.3")],
                         ports=[{"name": "p80", "port": 80}])])
    svc = "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert chain(r, "nat", "KUBE-SERVICES")[0] == (
        '-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP"'
        f' -m tcp --dport 80 -j {svc}')
    assert chain(r, "nat", "KUBE-SERVICES")[-1].endswith(
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    assert chain(r, "nat", svc) == [
        f'-A {svc} ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment '
        '"ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ',
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode '
        'random --probability 0.33333333349 -j KUBE-SEP-SXIVWICOYRO3J4NJ',
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic --mode '
        'random --probability 0.50000000000 -j '
        + endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.2:80"),
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" '
        f'-j {endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.3:80")}',
    ]
    assert chain(r, "nat", "KUBE-SEP-SXIVWICOYRO3J4NJ") == [
        '-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" '
        '-j KUBE-MARK-MASQ',
        '-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp '
        '-j DNAT --to-destination 10.180.0.1:80',
    ]
    assert chain(r, "filter", "KUBE-SERVICES") == []


def test_no_endpoints_rejects() -> None:
    r = rules_of([service("svc6", "ns6", cluster_ip="172.30.0.46", ports=HTTP,
                          type="NodePort", externalIPs=["192.168.99.46"])
                  | {"spec": {**service("svc6", "ns6", cluster_ip="172.30.0.46", type="NodePort",
                                        ports=[{**HTTP[0], "nodePort": 3006}],
                                        externalIPs=["192.168.99.46"])["spec"]}},
                  node(ips=["192.168.1.10"])])
    assert chain(r, "filter", "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no '
        'endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable']
    ext = chain(r, "filter", "KUBE-EXTERNAL-SERVICES")
    assert len(ext) == 2 and all("has no endpoints" in x and "REJECT" in x for x in ext)
    assert '-m addrtype --dst-type LOCAL -m tcp --dport 3006' in ext[1]
    assert not any(c.startswith("KUBE-SVC-") for _, c in r)
    assert chain(r, "nat", "KUBE-NODEPORTS") == []


def test_external_local_without_local_endpoints_drops_external_only() -> None:
    r = rules_of([node(ips=["192.168.1.10"]),
                  service("svc2", "ns2", cluster_ip="172.30.0.42", type="LoadBalancer",
                          externalTrafficPolicy="Local", healthCheckNodePort=30000,
                          ports=[{**HTTP[0], "nodePort": 3001}],
                          status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
                  slice_("svc2", "ns2", endpoints=[endpoint("10.180.0.2", "node-b")],
                         ports=[{"name": "p80", "port": 80}])])
    ext = chain(r, "filter", "KUBE-EXTERNAL-SERVICES")
    assert all('"ns2/svc2:p80 has no local endpoints"' in x and x.endswith("-j DROP")
               for x in ext) and len(ext) == 2
    assert chain(r, "filter", "KUBE-NODEPORTS") == [
        '-A KUBE-NODEPORTS -p tcp -m comment --comment "ns2/svc2:p80 health check node port" '
        '-m tcp --dport 30000 -j ACCEPT']
    suffix = chain_suffix("ns2/svc2:p80", "tcp")
    assert chain(r, "nat", f"KUBE-EXT-{suffix}") == [
        f'-A KUBE-EXT-{suffix} -s 10.0.0.0/8 -m comment --comment "pod traffic for ns2/svc2:p80 '
        f'external destinations" -j KUBE-SVC-{suffix}',
        f'-A KUBE-EXT-{suffix} -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 '
        'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ',
        f'-A KUBE-EXT-{suffix} -m comment --comment "route LOCAL traffic for ns2/svc2:p80 '
        f'external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-{suffix}',
    ]
    assert ("nat", f"KUBE-SVL-{suffix}") not in r


def test_internal_local_without_local_endpoints_drops_cluster_ip() -> None:
    r = rules_of([service("svc3", "ns3", cluster_ip="172.30.0.43", ports=HTTP,
                          internalTrafficPolicy="Local"),
                  slice_("svc3", "ns3", endpoints=[endpoint("10.180.0.3", "node-b")],
                         ports=[{"name": "p80", "port": 80}])])
    assert chain(r, "filter", "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -d 172.30.0.43/32 -p tcp -m comment --comment "ns3/svc3:p80 has no '
        'local endpoints" -m tcp --dport 80 -j DROP']


def test_affinity_and_source_ranges() -> None:
    r = rules_of([node(ips=["192.168.1.10"]),
                  service("svc5", "ns5", cluster_ip="172.30.0.45", type="LoadBalancer",
                          ports=[{**HTTP[0], "nodePort": 3005}], sessionAffinity="ClientIP",
                          loadBalancerSourceRanges=["203.0.113.0/25", "192.168.1.0/24"],
                          status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}),
                  slice_("svc5", "ns5", endpoints=[endpoint("10.180.0.5")],
                         ports=[{"name": "p80", "port": 80}])])
    s = chain_suffix("ns5/svc5:p80", "tcp")
    sep = endpoint_chain("ns5/svc5:p80", "tcp", "10.180.0.5:80")
    assert f'-A KUBE-SVC-{s} -m comment --comment "ns5/svc5:p80 -> 10.180.0.5:80" -m recent ' \
           f'--rcheck --seconds 10800 --reap --name {sep} --mask 255.255.255.255 --rsource ' \
           f'-j {sep}' in chain(r, "nat", f"KUBE-SVC-{s}")
    assert "-m recent --set --name" in chain(r, "nat", sep)[1]
    assert chain(r, "nat", f"KUBE-FW-{s}") == [
        f'-A KUBE-FW-{s} -s 203.0.113.0/25 -m comment --comment "ns5/svc5:p80 loadbalancer IP" '
        f'-j KUBE-EXT-{s}',
        f'-A KUBE-FW-{s} -s 192.168.1.0/24 -m comment --comment "ns5/svc5:p80 loadbalancer IP" '
        f'-j KUBE-EXT-{s}',
        # the node's own IP is in a range: the LB IP as source (hairpin) is admitted too
        f'-A KUBE-FW-{s} -s 5.6.7.8/32 -m comment --comment "ns5/svc5:p80 loadbalancer IP" '
        f'-j KUBE-EXT-{s}',
        f'-A KUBE-FW-{s} -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by '
        'KUBE-PROXY-FIREWALL"',
    ]
    assert chain(r, "filter", "KUBE-PROXY-FIREWALL") == [
        '-A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic '
        f'not accepted by KUBE-FW-{s}" -m tcp --dport 80 -j DROP']


def test_masquerade_mark_follows_the_bit() -> None:
    r = rules_of([], RuleOptions(masquerade_bit=3))
    assert chain(r, "nat", "KUBE-MARK-MASQ") == ["-A KUBE-MARK-MASQ -j MARK --set-xmark 0x8/0x8"]
    assert "-m mark ! --mark 0x8/0x8 -j RETURN" in chain(r, "nat", "KUBE-POSTROUTING")[0]


def test_ipv6_rules() -> None:
    plan = plan_of([service(cluster_ip=["10.96.0.1", "fd00::1"], ports=HTTP),
                    slice_("web", address_type="IPv6", endpoints=[endpoint("fd00:244::5")],
                           ports=[{"name": "p80", "port": 80}])])
    opts = RuleOptions(family=6)
    r = desired_ruleset(render_service_ports(plan.for_family(6), None, opts), opts)
    seps = [c for _, c in r if c.startswith("KUBE-SEP-")]
    assert chain(r, "nat", seps[0])[1].endswith("-j DNAT --to-destination [fd00:244::5]:80")
    assert "-d fd00::1/128" in chain(r, "nat", "KUBE-SERVICES")[0]
    r4 = desired_ruleset(render_service_ports(plan.for_family(4), None, RuleOptions()),
                         RuleOptions())
    assert "REJECT --reject-with icmp-port-unreachable" in chain(r4, "filter", "KUBE-SERVICES")[0]


def test_restore_text_order() -> None:
    text = restore_text({("nat", "KUBE-SVC-A"): ("-A KUBE-SVC-A -j KUBE-SEP-B",)},
                        [("nat", "KUBE-SEP-OLD")],
                        jumps=[("nat", "PREROUTING", "-j KUBE-SERVICES")])
    assert text.splitlines() == ["*nat", ":KUBE-SVC-A - [0:0]", ":KUBE-SEP-OLD - [0:0]",
                                 "-A KUBE-SVC-A -j KUBE-SEP-B", "-I PREROUTING 1 -j KUBE-SERVICES",
                                 "-X KUBE-SEP-OLD", "COMMIT"]
    assert restore_text({}, []) == ""


def test_every_rendered_chain_is_owned() -> None:
    """Every chain is svcproxy's, but KUBE-FIREWALL, which kubelet writes too (it
    is compared when svcproxy wants it, and removed only as svcproxy wrote it)."""
    r = rules_of([service(), slice_(endpoints=[endpoint("10.0.0.1")])])
    assert all(is_owned(t, c) for t, c in r if (t, c) != FIREWALL)
    assert all(key in r for key in SHARED)
    assert ServiceMap().backend_count() == 0


NODEPORTS = ('-m comment --comment "kubernetes service nodeports; NOTE: this must be the '
             'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')


def test_localhost_node_ports_as_kube_proxy() -> None:
    """iptables.localhostNodePorts (default true): NodePorts answer on
    127.0.0.1 (route_localnet, set by the plugin) behind kube-proxy's martian
    filter in KUBE-FIREWALL, jumped to from INPUT and OUTPUT; false: loopback
    excluded from the NodePort jump; IPv6 never serves NodePorts on ::1; with
    nodePortAddresses set, loopback is not among them."""
    objs = [service("np", type="NodePort", ports=[{**HTTP[0], "nodePort": 30080}]),
            slice_("np", endpoints=[endpoint("10.0.0.1")], ports=[{"name": "p80", "port": 80}])]
    on = rules_of(objs)
    assert on[FIREWALL] == (LOCALNET_FILTER,)
    assert on[("nat", "KUBE-SERVICES")][-1] == f"-A KUBE-SERVICES {NODEPORTS}"
    assert ("filter", "INPUT", "-j KUBE-FIREWALL") in jumps_for(replace(OPTS))
    off = rules_of(objs, replace(OPTS, localhost_node_ports=False))
    assert FIREWALL not in off
    assert off[("nat", "KUBE-SERVICES")][-1] == f"-A KUBE-SERVICES ! -d 127.0.0.0/8 {NODEPORTS}"
    assert ("filter", "INPUT", "-j KUBE-FIREWALL") not in jumps_for(
        replace(OPTS, localhost_node_ports=False))
    v6 = desired_ruleset({}, RuleOptions(family=6))
    assert v6[("nat", "KUBE-SERVICES")][-1] == f"-A KUBE-SERVICES ! -d ::1/128 {NODEPORTS}"
    assert FIREWALL not in v6
    assert not RuleOptions(node_port_addresses=("192.168.1.10",)).localnet


def test_node_cidr_detect_local_uses_the_nodes_pod_cidrs() -> None:
    """detectLocalMode NodeCIDR: pods are the Node's spec.podCIDRs; without one
    the detector is off, as kube-proxy."""
    from svcproxy.config import parse_config

    config = parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                          "kind: KubeProxyConfiguration\nmode: iptables\n"
                          "detectLocalMode: NodeCIDR\n", "c.yaml")
    with_cidrs = node("node-a")
    with_cidrs["spec"] = {"podCIDRs": ["10.244.3.0/24", "fd00:244:3::/64"]}
    plan = plan_of([with_cidrs, service()], "", "node-a")
    assert plan.node_pod_cidrs == ("10.244.3.0/24", "fd00:244:3::/64")
    assert rule_options(config, 4, plan).local_detector == ("-s", "10.244.3.0/24")
    assert rule_options(config, 6, plan).local_detector == ("-s", "fd00:244:3::/64")
    assert plan.for_family(6).node_pod_cidrs == ("fd00:244:3::/64",)
    bare = plan_of([node("node-a"), service()], "", "node-a")
    assert rule_options(config, 4, bare).local_detector is None
