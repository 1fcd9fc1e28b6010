"""Cold start: on a datapath's first sync of a large cluster the API server's
and the cluster DNS's Services are written first, additively, then the full
sync runs (kubernetes #133773). The core's choice and order against a
recording datapath; each built-in datapath's additive write against fakes of
its kernel doors, on a fresh node and on a node that already holds rules (a
restart, a takeover), where nothing else may change. tests/host runs the same
with real rules and traffic."""

from __future__ import annotations

from typing import Any

import pytest
from factories import RecordingDatapath, endpoint, node, plan_of, service, slice_

from svcproxy import hookimpl
from svcproxy.bus import Event, EventType
from svcproxy.config import parse_config
from svcproxy.datapath import ApplyResult
from svcproxy.errors import ConfigError
from svcproxy.ir import ServiceMap
from svcproxy.manager import PluginHost
from svcproxy.model import parse_object
from svcproxy.plugins.iptables.datapath import FamilyState as IptState
from svcproxy.plugins.iptables.datapath import sync_family as ipt_sync
from svcproxy.plugins.iptables.datapath import sync_first as ipt_first
from svcproxy.plugins.iptables.rules import RuleOptions
from svcproxy.plugins.ipvs.helper_state import HelperState
from svcproxy.plugins.ipvs.helpers import HelperOptions
from svcproxy.plugins.ipvs.servers import IpvsOptions, IpvsState
from svcproxy.plugins.kernel.fakes import FakeIpset, FakeIptables, FakeIpvsKernel, FakeNft
from svcproxy.plugins.nftables.datapath import FamilyState as NftState
from svcproxy.plugins.nftables.datapath import sync_family as nft_sync
from svcproxy.plugins.nftables.datapath import sync_first as nft_first
from svcproxy.plugins.nftables.rules import NftOptions
from svcproxy.proxy import Proxy

NODE_IP = "192.168.1.10"
PORTS = [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}]
EP_PORTS = [{"name": "p", "port": 8080, "protocol": "TCP"}]
DNS_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]
DNS_EP = [{"name": "dns", "port": 53, "protocol": "UDP"}]


def _svc(name: str, ns: str, ip: str, eps: list[str], *, dns: bool = False,
         labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    ports, ep_ports = (DNS_PORTS, DNS_EP) if dns else (PORTS, EP_PORTS)
    return [service(name, ns, cluster_ip=ip, ports=ports, labels=labels),
            slice_(name, ns, endpoints=[endpoint(e, "node-b") for e in eps], ports=ep_ports)]


def priority(api_eps: tuple[str, ...] = ("192.168.1.2",)) -> list[dict[str, Any]]:
    """The API server's Service and CoreDNS under its own name, found by label."""
    return [*_svc("kubernetes", "default", "10.96.0.1", list(api_eps)),
            *_svc("coredns", "kube-system", "10.96.0.10", ["10.244.9.9"], dns=True,
                  labels={"k8s-app": "kube-dns"})]


def others(n: int, first_ep: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        out += _svc(f"app{i}", "default", f"10.96.1.{i + 1}", [f"10.244.1.{first_ep + i}"])
    return out


def cluster(n: int = 6, **kw: Any) -> list[dict[str, Any]]:
    return [node("node-a", ips=[NODE_IP]), *priority(**kw), *others(n)]


# ---- the core ------------------------------------------------------------------------------

class FirstDatapath(RecordingDatapath):
    def __init__(self, answer: bool = True, fail: bool = False) -> None:
        super().__init__()
        self.order: list[tuple[str, set[str]]] = []
        self.answer, self.fail = answer, fail

    @hookimpl
    def svcproxy_apply_first(self, name: str, plan: ServiceMap) -> ApplyResult | None:
        self.order.append(("first", set(plan.services)))
        if self.fail:
            raise OSError("refused")
        return ApplyResult(changes=7) if self.answer else None

    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: Any, delta: Any, full: bool):  # type: ignore[no-untyped-def]
        self.order.append(("full" if full else "partial", set(plan.services)))
        return super().svcproxy_apply_plan(name, plan, delta, full)


CFG = ("apiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"
       "datapaths: [recording]\n")


def proxy_with(dp: RecordingDatapath, extra: str = "coldStart: {minServices: 5}\n",
               objects: list[dict[str, Any]] | None = None) -> Proxy:
    config = parse_config(CFG + extra, "cfg.yaml")
    host = PluginHost(config, extra_plugins=[("recording", dp)])
    host.configure()
    proxy = Proxy(config, host, "node-a", "recording", use_host_addresses=False)
    for obj in objects if objects is not None else cluster():
        proxy.bus.publish(Event(EventType.ADDED, parse_object(obj)))
    return proxy


def test_a_large_first_sync_writes_the_api_server_and_dns_first_then_everything() -> None:
    dp = FirstDatapath()
    proxy = proxy_with(dp)
    result = proxy.sync()
    assert result.ok and result.full
    everything = set(proxy.state.services)
    assert dp.order == [("first", {"default/kubernetes", "kube-system/coredns"}),
                        ("full", everything)]
    assert result.apply is not None and result.apply.details["cold_start_changes"] == 7
    assert result.apply.changes == 7 + len(result.plan)  # the recording datapath counts the delta
    assert "first" in result.phases and "first.plan" in result.phases
    # the next syncs are ordinary: nothing first again
    proxy.bus.publish(Event(EventType.MODIFIED, parse_object(
        slice_("app1", endpoints=[endpoint("10.244.7.7", "node-b")], ports=EP_PORTS))))
    proxy.sync()
    proxy.sync(full=True)
    assert [o[0] for o in dp.order] == ["first", "full", "partial", "full"]


def test_small_clusters_and_datapaths_without_an_additive_write_go_straight_to_full() -> None:
    dp = FirstDatapath()
    proxy_with(dp, "coldStart: {minServices: 100}\n").sync()
    assert [o[0] for o in dp.order] == ["full"]
    dp = FirstDatapath(answer=False)
    result = proxy_with(dp).sync()
    assert [o[0] for o in dp.order] == ["first", "full"] and "first" not in result.phases
    assert result.apply is not None and "cold_start_changes" not in result.apply.details
    # a cluster of nothing but the priority Services has no "rest" to wait for
    dp = FirstDatapath()
    proxy_with(dp, "coldStart: {minServices: 0}\n",
               [node("node-a", ips=[NODE_IP]), *priority()]).sync()
    assert [o[0] for o in dp.order] == ["full"]


def test_a_failed_first_write_is_logged_and_the_full_sync_still_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    dp = FirstDatapath(fail=True)
    result = proxy_with(dp).sync()
    assert result.ok and [o[0] for o in dp.order] == ["first", "full"]
    assert "cold start" in caplog.text and "refused" in caplog.text


def test_named_priority_services_replace_the_defaults() -> None:
    dp = FirstDatapath()
    proxy_with(dp, "coldStart: {minServices: 1, services: [default/app3, x/missing]}\n").sync()
    assert dp.order[0] == ("first", {"default/app3"})


@pytest.mark.parametrize("text, message", [
    ("coldStart: 5\n", "coldStart: must be a mapping"),
    ("coldStart: {minServices: -1}\n", "coldStart.minServices: must be >= 0 (got -1)"),
    ("coldStart: {services: [kubernetes]}\n",
     "coldStart.services: must be a list of namespace/name (got 'kubernetes')"),
    ("coldStart: {first: []}\n", "coldStart.first: unknown field"),
])
def test_bad_cold_start_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(CFG + text, "cfg.yaml")
    assert message in str(err.value) and "cfg.yaml" in str(err.value)


# ---- the datapaths' additive writes, on fakes ------------------------------------------------

FIRST = [node("node-a", ips=[NODE_IP]), *priority(api_eps=("192.168.1.3",))]
#: the cluster as it is now: the API server moved, app0 has a new endpoint,
#: app5 was deleted while svcproxy was down
NOW = [node("node-a", ips=[NODE_IP]), *priority(api_eps=("192.168.1.3",)), *others(5, 50)]


class Iptables:
    opts = RuleOptions(local_detector=("-s", "10.244.0.0/16"), node_ip=NODE_IP)

    def __init__(self) -> None:
        self.kernel = FakeIptables()

    def fresh(self) -> IptState:
        return IptState(self.kernel)  # type: ignore[arg-type]

    def full(self, state: Any, objects: list[dict[str, Any]]) -> None:
        ipt_sync(state, plan_of(objects), None, self.opts)

    def first(self, state: Any, objects: list[dict[str, Any]]) -> None:
        ipt_first(state, plan_of(objects), self.opts)

    def view(self) -> dict[Any, Any]:
        return dict(self.kernel.chains)


class Nftables:
    opts = NftOptions(local_detector=("saddr", "10.244.0.0/16"))

    def __init__(self) -> None:
        self.kernel = FakeNft()

    def fresh(self) -> NftState:
        return NftState(self.kernel)  # type: ignore[arg-type]

    def full(self, state: Any, objects: list[dict[str, Any]]) -> None:
        now = [1000.0]
        state.clock = lambda: now[0]
        plan = plan_of(objects)
        nft_sync(state, plan, None, self.opts)
        if state.stale:  # chains no longer used go a moment later
            now[0] += 60
            nft_sync(state, plan, None, self.opts)

    def first(self, state: Any, objects: list[dict[str, Any]]) -> None:
        assert nft_first(state, plan_of(objects), self.opts) is not None

    def view(self) -> dict[Any, Any]:
        table = self.kernel.table
        if table is None:
            return {}
        return {**{("chain", n): c.rules for n, c in table.chains.items()},
                **{("set", n): dict(s.elements) for n, s in table.sets.items()}}


class Ipvs:
    opts = HelperOptions(family=4, node_ip=NODE_IP, local_detector=("-s", "10.244.0.0/16"))

    def __init__(self) -> None:
        self.kernel = FakeIpvsKernel()
        self.kernel.link.node_addresses = [NODE_IP]
        self.ipset, self.ipt = FakeIpset(), FakeIptables()

    def fresh(self) -> tuple[IpvsState, HelperState]:
        return (IpvsState(self.kernel, IpvsOptions()),  # type: ignore[arg-type]
                HelperState(self.ipset, self.ipt, 4))

    def full(self, state: Any, objects: list[dict[str, Any]]) -> None:
        plan = plan_of(objects)
        state[1].sync(plan, None, self.opts)
        assert not state[0].sync(plan, None).failures

    def first(self, state: Any, objects: list[dict[str, Any]]) -> None:
        plan = plan_of(objects)
        state[1].sync_first(plan, self.opts)
        assert not state[0].sync(plan, list(plan.frontends), additive=True).failures

    def view(self) -> dict[Any, Any]:
        return {"ipvs": self.kernel.nl.table(), "bound": self.kernel.link.addresses(),
                "sets": {k: set(v) for k, v in self.ipset.sets.items()},
                **{("ipt", *k): v for k, v in self.ipt.chains.items()}}


DATAPATHS = [Iptables, Nftables, Ipvs]


@pytest.mark.parametrize("kind", DATAPATHS, ids=lambda k: k.__name__)
def test_on_a_fresh_node_the_first_write_holds_only_the_priority_services(kind: Any) -> None:
    dp = kind()
    state = dp.fresh()
    dp.first(state, FIRST)
    first = dp.view()
    alone = kind()
    alone.full(alone.fresh(), FIRST)
    assert first == alone.view()  # just what a full sync of those Services writes
    dp.full(state, NOW)
    reference = kind()
    reference.full(reference.fresh(), NOW)
    assert dp.view() == reference.view()  # and the full sync completes it


@pytest.mark.parametrize("kind", DATAPATHS, ids=lambda k: k.__name__)
def test_on_a_node_with_rules_the_first_write_removes_and_changes_nothing_else(
        kind: Any) -> None:
    dp = kind()
    before_objects = cluster(6)
    dp.full(dp.fresh(), before_objects)  # the previous run (or kube-proxy)
    before = dp.view()
    state = dp.fresh()  # svcproxy restarts with the cluster as it is now
    dp.first(state, [node("node-a", ips=[NODE_IP]), *priority(api_eps=("192.168.1.3",))])
    after = dp.view()
    # what the old cluster had is all still there, untouched, except the API
    # server's Service, which now goes to its new endpoint
    changed = {k for k in before if before[k] != after.get(k)}
    gone = {k for k in before if k not in after}
    assert not gone, gone
    assert changed, "the API server's new endpoint was not written"
    assert all(_about_api_server(k, before[k], after[k]) for k in changed), changed
    dp.full(state, NOW)
    reference = kind()
    reference.full(reference.fresh(), NOW)
    assert dp.view() == reference.view()


def _about_api_server(key: Any, old: Any, new: Any) -> bool:
    """A change the API server's moved endpoint explains: its own chain or
    real servers, an added rule or member, never a removed one."""
    text = repr((key, new))
    if isinstance(old, tuple) and isinstance(new, tuple):
        return set(old) <= set(new) or "kubernetes" in text
    if isinstance(old, dict) and isinstance(new, dict):
        kept = all(new.get(k) == v for k, v in old.items() if "192.168.1.2" not in repr((k, v)))
        return kept and "192.168.1.3" in text
    if isinstance(old, set) and isinstance(new, set):
        return old <= new
    return False


def test_ipvs_cold_start_masquerades_bound_vips_in_the_same_single_restore() -> None:
    """A restart's cold start (the IPVS plugin's apply_first): the early
    masquerade puts the VIPs already on kube-ipvs0 in KUBE-IPVS-IPS and leaves
    its rule to sync_first, whose one restore writes it first in
    KUBE-POSTROUTING with the other helper chains and jumps; alone (a full
    sync's start), early writes it at once."""
    from svcproxy.plugins.ipvs.helpers import vip_source_rule

    bound = ["10.96.0.1", "10.96.0.77"]  # a previous run's VIPs
    dp = Ipvs()
    helper = dp.fresh()[1]
    assert helper.early(bound, dp.opts, write_rule=False) == len(bound)
    assert dp.ipt.restores == 0
    helper.sync_first(plan_of(FIRST), dp.opts)
    assert dp.ipt.restores == 1
    assert dp.ipt.chains[("nat", "KUBE-POSTROUTING")][0] == vip_source_rule(4)
    assert set(bound) <= dp.ipset.sets["KUBE-IPVS-IPS"]
    assert any("KUBE-POSTROUTING" in r for r in dp.ipt.chains[("nat", "POSTROUTING")])
    alone = Ipvs()
    alone.fresh()[1].early(bound, alone.opts)
    assert alone.ipt.restores == 1
    assert alone.ipt.chains[("nat", "KUBE-POSTROUTING")][0] \
        == dp.ipt.chains[("nat", "KUBE-POSTROUTING")][0]
