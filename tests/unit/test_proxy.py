"""The sync loop: partial vs full syncs, failure handling and observers."""

from __future__ import annotations

from typing import Any

from factories import RecordingDatapath, endpoint, node, service, slice_

from svcproxy import hookimpl
from svcproxy.bus import Event, EventType
from svcproxy.config import parse_config
from svcproxy.datapath import SyncResult
from svcproxy.ir import FrontendKey
from svcproxy.manager import PluginHost
from svcproxy.model import parse_object
from svcproxy.proxy import Proxy

CFG = ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
       "mode: ipvs\nipvs: {syncPeriod: 30s}\n---\napiVersion: svcproxy.io/v1alpha1\n"
       "kind: SvcProxyConfiguration\ndatapaths: [recording]\n")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Observer:
    def __init__(self) -> None:
        self.results: list[SyncResult] = []
        self.events: list[str] = []

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        self.results.append(result)

    @hookimpl
    def svcproxy_observe_event(self, event: Event) -> None:
        self.events.append(str(event))


def make(cfg: str = CFG, dp: RecordingDatapath | None = None,
         clock: Clock | None = None) -> tuple[Proxy, RecordingDatapath, Observer, Clock]:
    dp, obs, clock = dp or RecordingDatapath(), Observer(), clock or Clock()
    config = parse_config(cfg.replace("mode: ipvs", "mode: ''"), "cfg.yaml")
    host = PluginHost(config, extra_plugins=[("recording", dp), ("observer", obs)])
    host.configure()
    proxy = Proxy(config, host, "node-a", "recording", clock=clock, use_host_addresses=False)
    return proxy, dp, obs, clock


def send(proxy: Proxy, obj: dict[str, Any], type_: EventType = EventType.ADDED) -> None:
    proxy.bus.publish(Event(type_, parse_object(obj)))


def populate(proxy: Proxy) -> None:
    send(proxy, node())
    for name, ip in (("a", "10.96.0.1"), ("b", "10.96.0.2")):
        send(proxy, service(name, cluster_ip=ip))
        send(proxy, slice_(name, endpoints=[endpoint("10.244.1.1", "node-a")]))


def test_first_sync_is_full_then_partial_syncs_touch_only_changes() -> None:
    proxy, dp, obs, clock = make()
    populate(proxy)
    r = proxy.sync()
    assert r.ok and r.full and r.created == 2 and len(dp.programmed) == 2
    clock.t += 1
    send(proxy, slice_("a", endpoints=[endpoint("10.244.1.1", "node-a"),
                                       endpoint("10.244.2.2", "node-b")]), EventType.MODIFIED)
    r = proxy.sync()
    full, delta = dp.calls[-1]
    assert not full and r.ok and not r.full
    assert delta.updated == (FrontendKey("10.96.0.1", 80, "TCP"),) and not delta.created
    assert r.services_changed == 1
    assert len(dp.programmed.get(FrontendKey("10.96.0.1", 80, "TCP")).backends) == 2  # type: ignore[union-attr]
    assert "ADDED Service default/a" in obs.events and len(obs.results) == 2


def test_no_change_writes_nothing() -> None:
    proxy, dp, _, clock = make()
    populate(proxy)
    proxy.sync()
    n = len(dp.calls)
    clock.t += 1
    send(proxy, service("a", cluster_ip="10.96.0.1"), EventType.MODIFIED)  # same content
    r = proxy.sync()
    assert r.ok and len(dp.calls) == n and r.services_changed == 0


def test_deleting_a_service_deletes_its_frontends() -> None:
    proxy, dp, _, clock = make()
    populate(proxy)
    proxy.sync()
    clock.t += 1
    send(proxy, service("b", cluster_ip="10.96.0.2"), EventType.DELETED)
    r = proxy.sync()
    assert r.deleted == 1 and FrontendKey("10.96.0.2", 80, "TCP") not in dp.programmed


def test_failed_apply_keeps_last_good_state_and_retries_in_full() -> None:
    proxy, dp, _, clock = make()
    populate(proxy)
    proxy.sync()
    good = proxy.applied
    clock.t += 1
    send(proxy, service("c", cluster_ip="10.96.0.3"))
    dp.fail_with = OSError("iptables-restore: line 7 failed")
    r = proxy.sync()
    assert not r.ok and "iptables-restore: line 7 failed" in r.error
    assert proxy.applied is good and "default/c" in proxy.dirty
    dp.fail_with = None
    clock.t += 1
    r = proxy.sync()
    assert r.ok and r.full and r.created == 1
    assert FrontendKey("10.96.0.3", 80, "TCP") in dp.programmed


def test_node_change_replans_everything() -> None:
    proxy, dp, _, clock = make()
    send(proxy, node(ips=["192.168.1.10"]))
    send(proxy, service("np", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    proxy.sync()
    clock.t += 1
    send(proxy, node(ips=["192.168.1.10", "192.168.1.11"]), EventType.MODIFIED)
    r = proxy.sync()
    assert r.full and r.created == 1
    assert FrontendKey("192.168.1.11", 30080, "TCP") in dp.programmed


def test_periodic_full_sync_after_sync_period() -> None:
    proxy, dp, _, clock = make()
    populate(proxy)
    proxy.sync()
    clock.t += 10
    assert not proxy.sync().full
    clock.t += 25
    r = proxy.sync()
    assert r.full and dp.calls[-1][0] is True  # a full sync reaches the datapath even unchanged


def test_oldest_change_is_reported_for_programming_latency() -> None:
    proxy, _, obs, clock = make()
    populate(proxy)
    proxy.sync()
    clock.t += 1
    send(proxy, service("c", cluster_ip="10.96.0.3"))
    r = proxy.sync()
    assert r.oldest_change is not None and obs.results[-1] is r


def test_full_sync_period_adapts_to_full_sync_cost() -> None:
    clock = Clock()

    class SlowFull(RecordingDatapath):
        @hookimpl
        def svcproxy_apply_plan(self, name, plan, delta, full):  # type: ignore[no-untyped-def]
            if full:
                clock.t += 10  # a full sync that takes 10s
            return super().svcproxy_apply_plan(name, plan, delta, full)

    proxy, _, _, _ = make(dp=SlowFull(), clock=clock)
    populate(proxy)
    assert proxy.sync().full
    assert proxy.full_sync_period() == 1000.0  # 100 x 10s beats syncPeriod 30s
    clock.t += 500
    assert not proxy.sync().full
    clock.t += 501
    assert proxy.sync().full


def test_configured_full_sync_period() -> None:
    proxy, _, _, clock = make(CFG + "fullSyncPeriod: 5m\n")
    populate(proxy)
    proxy.sync()
    assert proxy.full_sync_period() == 300
    clock.t += 200
    assert not proxy.sync().full
    clock.t += 101
    assert proxy.sync().full


def test_datapath_followup_is_called_without_changes() -> None:
    from svcproxy.datapath import ApplyResult

    class Draining(RecordingDatapath):
        pending = 2

        @hookimpl
        def svcproxy_apply_plan(self, name, plan, delta, full):  # type: ignore[no-untyped-def]
            result = super().svcproxy_apply_plan(name, plan, delta, full)
            if result is None:
                return None
            self.pending -= 1
            return ApplyResult(followup=self.pending > 0)

    dp = Draining()
    proxy, _, _, clock = make(dp=dp)
    populate(proxy)
    proxy.sync()
    clock.t += 1
    proxy.sync()  # nothing changed, but the datapath asked to be called again
    assert len(dp.calls) == 2
    clock.t += 1
    proxy.sync()  # no follow-up asked: nothing to do
    assert len(dp.calls) == 2


class Broken:
    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        raise RuntimeError("a metrics bug")

    @hookimpl
    def svcproxy_observe_event(self, event: Event) -> None:
        raise KeyError("another bug")


def test_an_observer_that_raises_does_not_silence_the_others(caplog: Any) -> None:
    """Observers run isolated: the broken one (registered first, so called
    first) is logged by name, the next still sees every event and sync."""
    dp, obs = RecordingDatapath(), Observer()
    config = parse_config(CFG.replace("mode: ipvs", "mode: ''"), "cfg.yaml")
    host = PluginHost(config, extra_plugins=[("recording", dp), ("broken", Broken()),
                                             ("observer", obs)])
    host.configure()
    proxy = Proxy(config, host, "node-a", "recording", clock=Clock(), use_host_addresses=False)
    populate(proxy)
    r = proxy.sync()
    assert r.ok and obs.results == [r]
    assert len(obs.events) == 5
    failures = [rec for rec in caplog.records if "plugin 'broken' failed" in rec.getMessage()]
    assert {("svcproxy_observe_sync" in f.getMessage()) for f in failures} == {True, False}
