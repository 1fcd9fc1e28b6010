"""Prometheus metrics: kube-proxy's names, types, buckets and labels
(kube-proxy's pkg/proxy/metrics/metrics.go), so existing
dashboards and alerts keep working, plus svcproxy_* metrics kube-proxy lacks.

Everything lives in a private registry (several proxies in one test process do
not collide). kube-proxy's counters carry no `_created` samples either.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics as _disable_created
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from svcproxy.datapath import MetricSample, SyncResult
from svcproxy.ir import ServiceMap, ip_family
from svcproxy.model import EndpointSlice

_disable_created()  # type: ignore[no-untyped-call]  # (prometheus_client leaves it untyped)

#: kube-proxy's sync duration buckets: 1 ms doubling up to ~16 s
SYNC_BUCKETS = tuple(0.001 * 2**k for k in range(15))
#: kube-proxy's network programming buckets
NP_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
#: svcproxy's phase buckets: 100 µs doubling up to ~27 min
PHASE_BUCKETS = tuple(0.0001 * 2**k for k in range(24))
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def family_name(family: int) -> str:
    return f"IPv{family}"


def parse_trigger_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _Samples(Collector):
    """Scrape-time samples from the plugins (svcproxy_collect_metrics)."""

    def __init__(self, source: Callable[[], Sequence[MetricSample]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        families: dict[tuple[Any, ...], Any] = {}
        for s in self.source():
            key = s.key()
            fam = families.get(key)
            if fam is None:
                labels = sorted(s.labels)
                cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                fam = families[key] = cls(s.name, s.help, labels=labels)
            fam.add_metric([s.labels[k] for k in sorted(s.labels)], s.value)
        yield from families.values()


class _PlanCounts(Collector):
    """Counts over the programmed plan, computed when scraped."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        plan = self.metrics.plan
        fronts = GaugeMetricFamily("svcproxy_frontends", "Frontends (virtual servers, "
                                   "service matches) programmed", labels=["ip_family"])
        backs = GaugeMetricFamily("svcproxy_backends", "Backends (real servers) programmed",
                                  labels=["ip_family"])
        no_local = GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            labels=["traffic_policy", "ip_family"])
        if plan is not None:
            counts = {4: [0, 0], 6: [0, 0]}
            svc_families: dict[str, set[int]] = {}
            for fe in plan.frontends.values():
                fam = ip_family(fe.address)
                c = counts[fam]
                c[0] += 1
                c[1] += len(fe.backends)
                svc_families.setdefault(fe.service_key, set()).add(fam)
            families = {4} | {f for f, c in counts.items() if c[0]}
            nl = {(p, f): 0 for p in ("internal", "external") for f in families}
            for key, summary in plan.services.items():
                for f in svc_families.get(key, {4}):
                    if summary.no_local_endpoints_internal:
                        nl[("internal", f)] += 1
                    if summary.no_local_endpoints_external:
                        nl[("external", f)] += 1
            for f in sorted(families):
                fronts.add_metric([family_name(f)], counts[f][0])
                backs.add_metric([family_name(f)], counts[f][1])
            for (policy, f), n in sorted(nl.items()):
                no_local.add_metric([policy, family_name(f)], n)
        yield from (fronts, backs, no_local)


class ProxyMetrics:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.lock = threading.Lock()
        r = self.registry = CollectorRegistry(auto_describe=True)
        fam = ["ip_family"]
        # -- kube-proxy's ------------------------------------------------------------
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            fam, buckets=SYNC_BUCKETS, registry=r)
        self.sync_full = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs", fam, buckets=SYNC_BUCKETS,
            registry=r)
        self.sync_partial = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", fam,
            buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", fam, registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", fam, registry=r)
        #: its children, each looked up once (every object's change sets one)
        self._queued: dict[int, Any] = {}
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds", fam, buckets=NP_BUCKETS,
            registry=r)
        self.endpoint_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_total = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes", registry=r)
        self.service_total = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes", registry=r)
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures", fam, registry=r)
        self.healthz = Counter("kubeproxy_proxy_healthz_total",
                               "Cumulative proxy healthz HTTP status", ["code"], registry=r)
        self.livez = Counter("kubeproxy_proxy_livez_total",
                             "Cumulative proxy livez HTTP status", ["code"], registry=r)
        # -- svcproxy's --------------------------------------------------------------
        self.datapath_info = Gauge(
            "svcproxy_datapath_info", "The active datapath (value 1)", ["datapath"],
            registry=r)
        self.fallback_info = Gauge(
            "svcproxy_datapath_fallback_info",
            "A datapath that was skipped at start-up, and why (value 1)",
            ["datapath", "reason"], registry=r)
        self.syncs = Counter("svcproxy_syncs_total", "Sync attempts by kind and outcome",
                             ["kind", "outcome"], registry=r)
        self.phase = Histogram(
            "svcproxy_sync_phase_duration_seconds",
            "Duration of each sync phase (plan, apply and the datapath's own steps)",
            ["phase", "kind"], buckets=PHASE_BUCKETS, registry=r)
        self.plan: ServiceMap | None = None
        r.register(_PlanCounts(self))
        self.draining = Gauge("svcproxy_backends_draining",
                              "Removed backends still draining their connections",
                              registry=r)
        self.changes = Counter("svcproxy_sync_kernel_changes_total",
                               "Kernel objects written or removed by syncs", registry=r)
        self.source_errors = Counter(
            "svcproxy_source_errors_total",
            "Failed reads of the cluster: API server requests that failed (each retry "
            "counted) and manifest problems; what was read before keeps being served",
            ["source", "resource"], registry=r)
        #: (wall time the change arrived, its trigger time, family), until a
        #: sync that started after it arrived has programmed it
        self.pending_triggers: list[tuple[float, float, int]] = []

    def add_samples(self, source: Callable[[], Sequence[MetricSample]]) -> None:
        self.registry.register(_Samples(source))

    # -- inputs ------------------------------------------------------------------------

    def started(self, datapath: str, skipped: Iterable[tuple[str, str]]) -> None:
        self.datapath_info.labels(datapath).set(1)
        for name, reason in skipped:
            self.fallback_info.labels(name, reason).set(1)

    def switched(self, datapath: str, previous: str) -> None:
        self.datapath_info.labels(previous).set(0)
        self.datapath_info.labels(datapath).set(1)

    def endpoint_change(self, obj: EndpointSlice) -> None:
        """An EndpointSlice changed: count it, and remember when the change was
        triggered (its annotation, else now) for network programming latency."""
        now = self.wall()
        trigger = parse_trigger_time(obj.annotation(TRIGGER_ANNOTATION)) or now
        family = 6 if obj.address_type == "IPv6" else 4
        with self.lock:
            self.endpoint_pending.inc()
            self.endpoint_total.inc()
            self.pending_triggers.append((now, trigger, family))
            self._queued_gauge(family).set(now)

    def _queued_gauge(self, family: int) -> Any:
        gauge = self._queued.get(family)
        if gauge is None:
            gauge = self._queued[family] = self.last_queued.labels(family_name(family))
        return gauge

    def service_change(self) -> None:
        with self.lock:
            self.service_pending.inc()
            self.service_total.inc()
            self._queued_gauge(4).set(self.wall())

    def sync(self, result: SyncResult) -> None:
        kind = "full" if result.full else "partial"
        self.syncs.labels(kind, "ok" if result.ok else "error").inc()
        plan = result.plan
        families = {4} | (set(plan.families()) if plan is not None else set())
        for phase, seconds in result.phases.items():
            self.phase.labels(phase, kind).observe(seconds)
        if not result.ok:
            for f in families:
                self.restore_failures.labels(family_name(f)).inc()
            return
        now = self.wall()
        for f in families:
            name = family_name(f)
            self.sync_duration.labels(name).observe(result.duration)
            (self.sync_full if result.full else self.sync_partial).labels(name).observe(
                result.duration)
            self.last_sync.labels(name).set(now)
        with self.lock:
            # a change that arrived while this sync ran is not in its plan:
            # it waits for the next sync (kube-proxy takes a sync's changes
            # when the sync starts; counting them here would hide their wait)
            triggers = [t for t in self.pending_triggers if t[0] <= result.started]
            self.pending_triggers = [t for t in self.pending_triggers
                                     if t[0] > result.started]
            self.endpoint_pending.set(len(self.pending_triggers))
            self.service_pending.set(0)
        for _, trigger, f in triggers:
            self.network_programming.labels(family_name(f)).observe(max(0.0, now - trigger))
        if result.apply is not None:
            self.changes.inc(result.apply.changes)
            draining = result.apply.details.get("draining")
            self.draining.set(float(draining) if isinstance(draining, int | float) else 0)
        if plan is not None:
            self.plan = plan  # counted at scrape time: a partial sync stays O(change)
