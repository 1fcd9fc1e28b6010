"""kubeproxy_network_programming_duration_seconds: each EndpointSlice change
is observed by the first sync that started after it arrived, from its trigger
time (ProxyMetrics with a clock of the test's)."""

from __future__ import annotations

from factories import endpoint, slice_
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from svcproxy.datapath import SyncResult
from svcproxy.model import parse_endpoint_slice
from svcproxy.plugins.metrics.prom import ProxyMetrics

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def observed(m: ProxyMetrics) -> tuple[float, float]:
    """(count, sum) of the IPv4 network programming histogram."""
    out = {s.name: s.value for f in text_string_to_metric_families(
        generate_latest(m.registry).decode()) for s in f.samples
        if s.name.startswith("kubeproxy_network_programming_duration_seconds_")
        and s.labels.get("ip_family") == "IPv4"}
    return (out.get("kubeproxy_network_programming_duration_seconds_count", 0.0),
            out.get("kubeproxy_network_programming_duration_seconds_sum", 0.0))


def pending(m: ProxyMetrics) -> float:
    return next(s.value for f in text_string_to_metric_families(
        generate_latest(m.registry).decode()) for s in f.samples
        if s.name == "kubeproxy_sync_proxy_rules_endpoint_changes_pending")


def change(m: ProxyMetrics, trigger: str) -> None:
    m.endpoint_change(parse_endpoint_slice(slice_(
        "web", endpoints=[endpoint("10.244.1.11", "node-a")], annotations={TRIGGER: trigger})))


def test_a_change_arriving_during_a_sync_waits_for_the_next_one() -> None:
    clock = [1_000_000.0]  # 1970-01-12T13:46:40Z
    m = ProxyMetrics(wall=lambda: clock[0])
    change(m, "1970-01-12T13:46:39Z")  # triggered 1 s before it arrived
    clock[0] += 0.5
    started = clock[0]  # a sync starts: it holds the first change
    clock[0] += 2.0
    change(m, "1970-01-12T13:46:42Z")  # arrives meanwhile (at 1,000,002.5)
    clock[0] += 0.5
    m.sync(SyncResult(datapath="iptables", full=False, ok=True, started=started,
                      duration=2.5))
    # only the first: 1 s before arrival + 0.5 s + 2.5 s of sync
    assert observed(m) == (1, 4.0)
    assert pending(m) == 1
    clock[0] += 1.0
    m.sync(SyncResult(datapath="iptables", full=False, ok=True, started=clock[0] - 0.25,
                      duration=0.25))
    assert observed(m) == (2, 4.0 + 2.0)  # the second: trigger 1,000,002 -> 1,000,004
    assert pending(m) == 0


def test_a_failed_sync_programs_nothing() -> None:
    clock = [1_000_000.0]
    m = ProxyMetrics(wall=lambda: clock[0])
    change(m, "1970-01-12T13:46:40Z")
    clock[0] += 1.0
    m.sync(SyncResult(datapath="iptables", full=False, ok=False, started=clock[0] - 0.5,
                      duration=0.5, error="boom"))
    assert observed(m) == (0, 0.0) and pending(m) == 1
