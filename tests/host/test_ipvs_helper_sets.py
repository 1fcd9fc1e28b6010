"""The IPVS datapath's helper ipsets and iptables rules against the host
kernel's ipset and iptables (in a namespace made here; no IPVS needed): after a
full sync and after partial syncs of every kind, every helper set read back
with `ipset save` holds exactly what a full rendering of the plan says, and a
member that stays across a change is never deleted.

Regression for the bug where a member kept across a change was both "removed"
and "added" and ended up deleted (KUBE-CLUSTER-IP, KUBE-IPVS-IPS and
KUBE-LOOP-BACK emptied by every endpoint change until the next full sync)."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from factories import endpoint, node, plan_of, service, slice_
from netns import ipset_save

from svcproxy.ir import FrontendKey, ServiceMap
from svcproxy.plugins.ipvs.helper_state import HelperState
from svcproxy.plugins.ipvs.helpers import (
    SETS,
    HelperOptions,
    helper_chains,
    is_owned,
    set_entries,
)
from svcproxy.plugins.kernel.ipset import Ipset
from svcproxy.plugins.kernel.iptables import IptablesKernel, parse_save

NODE_IP = "192.168.1.10"
OPTS = HelperOptions(family=4, node_ip=NODE_IP, local_detector=("-s", "10.244.0.0/16"))
HTTP = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
DNS = {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}
_ids = itertools.count()


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"svphset{next(_ids)}-{id(OPTS) % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          check=True).stdout


def kernel_sets(ns: str) -> dict[str, set[str]]:
    """Every KUBE- set, as `ipset save` (not svcproxy's reader) shows it."""
    return ipset_save(ns)


def kernel_chains(ns: str) -> dict[tuple[str, str], tuple[str, ...]]:
    saved = parse_save(run(ns, "iptables-nft-save"))
    return {(t, c): rules for t, tab in saved.items() for c, rules in tab.chains.items()
            if is_owned(t, c)}


def expected(plan: ServiceMap) -> tuple[dict[str, set[str]],
                                       dict[tuple[str, str], tuple[str, ...]]]:
    """What a from-scratch rendering of `plan` puts in every set and chain."""
    bound = {fe.address for fe in plan.frontends.values() if fe.bind_address}
    entries, out_filter = set_entries(plan, bound, 4, NODE_IP)
    return entries, helper_chains(entries, out_filter, OPTS)


def changed_keys(before: ServiceMap, after: ServiceMap) -> set[FrontendKey]:
    keys = set(before.frontends) | set(after.frontends)
    return {k for k in keys if before.frontends.get(k) != after.frontends.get(k)}


def cluster(**over: Any) -> list[dict[str, Any]]:
    """A node-a cluster using every kind of helper set; `over` replaces objects
    by name (None removes one)."""
    objects: dict[str, Any] = {
        "node": node("node-a", ips=[NODE_IP]),
        "web": service("web", cluster_ip="10.96.0.10", ports=[HTTP, DNS]),
        "web-eps": slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                            endpoint("10.244.2.12", "node-b")],
                          ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                 {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        "np": service("np", cluster_ip="10.96.0.20", type="NodePort",
                      externalTrafficPolicy="Local",
                      ports=[{**HTTP, "nodePort": 30080}]),
        "np-eps": slice_("np", endpoints=[endpoint("10.244.1.21", "node-a")]),
        "lb": service("lb", cluster_ip="10.96.0.30", type="LoadBalancer",
                      externalTrafficPolicy="Local", healthCheckNodePort=32000,
                      ports=[{**HTTP, "nodePort": 30090}],
                      loadBalancerSourceRanges=["203.0.113.0/24", "192.168.1.0/24"],
                      status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}),
        "lb-eps": slice_("lb", endpoints=[endpoint("10.244.1.31", "node-a"),
                                          endpoint("10.244.3.32", "node-c")]),
        "ext": service("ext", cluster_ip="10.96.0.40", ports=[HTTP],
                       externalIPs=["203.0.113.40"]),
        "ext-eps": slice_("ext", endpoints=[endpoint("10.244.2.41", "node-b")]),
        "sctp": service("sctp", cluster_ip="10.96.0.50", type="NodePort",
                        ports=[{"name": "s", "port": 90, "protocol": "SCTP",
                                "targetPort": 9090, "nodePort": 30050}]),
        "sctp-eps": slice_("sctp", endpoints=[endpoint("10.244.1.51", "node-a")],
                           ports=[{"name": "s", "port": 9090, "protocol": "SCTP"}]),
    }
    objects.update(over)
    return [o for o in objects.values() if o is not None]


WEB_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
             {"name": "dns", "port": 5353, "protocol": "UDP"}]

#: one partial sync each, applied in turn on top of the previous step
STEPS: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("an endpoint removed from a two-port Service", lambda: {
        "web-eps": slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")],
                          ports=WEB_PORTS)}),
    ("an endpoint added", lambda: {
        "web-eps": slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                                            endpoint("10.244.1.13", "node-a")],
                          ports=WEB_PORTS)}),
    ("the local endpoint of a Local NodePort goes away", lambda: {
        "np-eps": slice_("np", endpoints=[endpoint("10.244.2.22", "node-b")])}),
    # (the node stays inside a range: a range without it needs the ipvs match,
    # which only a kernel with IPVS has; the VM tests cover that rule)
    ("a LoadBalancer's source ranges change", lambda: {
        "lb": service("lb", cluster_ip="10.96.0.30", type="LoadBalancer",
                      externalTrafficPolicy="Local", healthCheckNodePort=32000,
                      ports=[{**HTTP, "nodePort": 30090}],
                      loadBalancerSourceRanges=["198.51.100.0/24", "192.168.1.0/24"],
                      status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}})}),
    ("a LoadBalancer's health check port and policy change", lambda: {
        "lb": service("lb", cluster_ip="10.96.0.30", type="LoadBalancer",
                      ports=[{**HTTP, "nodePort": 30090}],
                      loadBalancerSourceRanges=["198.51.100.0/24", "192.168.1.0/24"],
                      status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}})}),
    ("a port added to a Service", lambda: {
        "ext": service("ext", cluster_ip="10.96.0.40",
                       ports=[HTTP, {**HTTP, "name": "alt", "port": 81}],
                       externalIPs=["203.0.113.40"]),
        "ext-eps": slice_("ext", endpoints=[endpoint("10.244.2.41", "node-b")],
                          ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                 {"name": "alt", "port": 8080, "protocol": "TCP"}])}),
    ("a Service deleted and another created with its ClusterIP", lambda: {
        "sctp": None, "sctp-eps": None,
        "sctp2": service("sctp2", cluster_ip="10.96.0.50", ports=[HTTP]),
        "sctp2-eps": slice_("sctp2", endpoints=[endpoint("10.244.1.51", "node-a")])}),
    ("a NodePort's port moved to another Service", lambda: {
        "np": service("np", cluster_ip="10.96.0.20", ports=[HTTP]),
        "web": service("web", cluster_ip="10.96.0.10", type="NodePort",
                       ports=[{**HTTP, "nodePort": 30080}, DNS])}),
    ("every endpoint of a Service gone", lambda: {
        "web-eps": slice_("web", endpoints=[], ports=WEB_PORTS)}),
    ("a Service deleted", lambda: {"ext": None, "ext-eps": None}),
]


def assert_kernel_matches(ns: str, helper: HelperState, plan: ServiceMap, step: str) -> None:
    want_sets, want_chains = expected(plan)
    have = kernel_sets(ns)
    for name in SETS:
        assert have.get(name) == want_sets[name], (step, name)
    assert helper.sets is not None
    assert {n: helper.sets[n] for n in SETS} == {n: have[n] for n in SETS}, step
    assert kernel_chains(ns) == want_chains, step


def test_every_helper_set_is_right_after_partial_syncs_of_every_kind(ns: str) -> None:
    ipset = Ipset(ns)
    try:
        helper = HelperState(ipset, IptablesKernel(4, "nft", ns), 4)
        over: dict[str, Any] = {}
        plan = plan_of(cluster())
        helper.sync(plan, None, OPTS)
        assert_kernel_matches(ns, helper, plan, "full sync")
        assert kernel_sets(ns)["KUBE-CLUSTER-IP"] >= {"10.96.0.10,tcp:80", "10.96.0.10,udp:53"}
        for step, change in STEPS:
            over.update(change())
            new = plan_of(cluster(**over))
            changed = changed_keys(plan, new)
            assert changed, step
            helper.sync(new, changed, OPTS)
            assert_kernel_matches(ns, helper, new, step)
            plan = new
        # and a full sync after all of it finds nothing to repair
        assert helper.sync(plan, None, OPTS) == 0
    finally:
        ipset.close()


def test_a_member_kept_across_a_change_is_not_written(ns: str) -> None:
    """The writer sees only the net difference: an endpoint removal sends the
    one KUBE-LOOP-BACK deletion, not a delete and add of the VIP's entries."""
    ipset = Ipset(ns)
    try:
        helper = HelperState(ipset, IptablesKernel(4, "nft", ns), 4)
        plan = plan_of(cluster())
        helper.sync(plan, None, OPTS)
        sent: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]] = []
        real = ipset.write

        def recording(adds: list[tuple[str, str]], dels: list[tuple[str, str]],
                      family: int) -> list[Any]:
            sent.append((list(adds), list(dels)))
            return real(adds, dels, family)

        ipset.write = recording  # type: ignore[method-assign]
        new = plan_of(cluster(**{"web-eps": slice_("web", endpoints=[
            endpoint("10.244.1.11", "node-a"), endpoint("10.244.1.14", "node-a")],
            ports=WEB_PORTS)}))
        helper.sync(new, changed_keys(plan, new), OPTS)
        assert [(sorted(a), d) for a, d in sent] == [(
            [("KUBE-LOOP-BACK", "10.244.1.14,tcp:8080,10.244.1.14"),
             ("KUBE-LOOP-BACK", "10.244.1.14,udp:5353,10.244.1.14")], [])], sent
        assert_kernel_matches(ns, helper, new, "endpoint replaced")
    finally:
        ipset.close()
