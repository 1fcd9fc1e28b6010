"""The proxy: wires state, planner, datapath and runner together.

One sync = snapshot the dirty Services, plan (partially, or fully every
syncPeriod, after a Node change and after a failure), hand the plan and its
delta to the active datapath, and on success adopt the plan as the applied
state. On failure the applied state, the dirty set and the kernel's last good
rules all stay as they were; the runner retries with backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from .bus import EventBus
from .config import Config
from .datapath import ApplyResult, SyncResult
from .gcpause import gc_paused, trim_heap
from .ir import ServiceMap
from .manager import PluginHost
from .phases import recording
from .plan import PlanContext, Planner, make_context
from .runner import SyncPolicy, SyncRunner
from .state import Change, ClusterState

log = logging.getLogger(__name__)

#: the full-sync period's default is this many times the last full sync's
#: duration (at least syncPeriod): a full sync blocks the partial syncs behind
#: it, and at 10,000 services on iptables-legacy a 3-5 s full sync every ~40 s
#: (when this was 10) doubled churn's p99 programming latency (4.98 s against
#: 2.38 s without periodic full syncs, benchmarks/RESULTS.md); drift is still
#: repaired within minutes there, and at once after any failed sync
FULL_SYNC_COST_FACTOR = 100
#: the Services a cold start programs first unless coldStart.services names
#: others: the API server's, the cluster DNS (by name, and by kube-dns's label,
#: which CoreDNS deployments keep under other names)
DEFAULT_PRIORITY = ("default/kubernetes", "kube-system/kube-dns")
DNS_LABEL = ("k8s-app", "kube-dns")


def _merged(first: ApplyResult, full: ApplyResult) -> ApplyResult:
    """The full apply's result with the cold-start write's changes counted in."""
    details = dict(full.details)
    details["cold_start_changes"] = first.changes
    return dataclasses.replace(full, changes=full.changes + first.changes, details=details)


class Proxy:
    def __init__(self, config: Config, plugins: PluginHost, node_name: str, datapath: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 use_host_addresses: bool = True) -> None:
        self.config = config
        self.plugins = plugins
        self.node_name = node_name
        self.datapath = datapath
        self.clock = clock
        self.use_host_addresses = use_host_addresses
        self.state = ClusterState(node_name)
        self.bus = EventBus(self.state, plugins, self._on_change)
        self.planner = Planner(plugins)
        self.applied = ServiceMap()
        self._lock = threading.Lock()  # guards dirty/needs_full/oldest
        self._sync_lock = threading.Lock()  # one sync at a time
        self.dirty: set[str] = set()
        self.needs_full = True
        self._oldest_change: float | None = None
        self._last_full: float | None = None
        self._last_full_duration = 0.0
        self._followup = False
        self.runner: SyncRunner | None = None
        self.last_result: SyncResult | None = None
        #: consecutive failed syncs and the reason last logged: a failure that
        #: repeats is logged once (then at debug level), its end once
        self.failures = 0
        self._failure_logged = ""
        #: a datapath to switch to at the next sync, and why
        self._switch: tuple[str, str] | None = None

    def switch_datapath(self, name: str, reason: str) -> None:
        """Make `name` the active datapath from the next sync on (a full one
        that programs everything from scratch); the runner is asked to sync."""
        with self._lock:
            self._switch = (name, reason)
            self.needs_full = True
        if self.runner is not None:
            self.runner.request()

    def _take_switch(self) -> None:
        with self._lock:
            switch, self._switch = self._switch, None
        if switch is None or switch[0] == self.datapath:
            return
        name, reason = switch
        previous, self.datapath = self.datapath, name
        log.warning("switching from the %s datapath to %s: %s", previous, name, reason)
        self.applied = ServiceMap()  # the new datapath holds nothing yet
        self._followup = False
        self.failures = 0
        self.plugins.datapath_changed(name, previous, reason)

    def set_node_name(self, name: str) -> None:
        """Set the node once the sources have been read (it may come from them)."""
        with self.bus.lock:
            self.node_name = name
            self.state.node_name = name
            self.needs_full = True

    # -- changes ----------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        with self._lock:
            self.dirty |= change.services
            if change.node:
                self.needs_full = True
            if self._oldest_change is None:
                self._oldest_change = change.at
        if self.runner is not None:
            self.runner.request()

    def context(self) -> PlanContext:
        host: dict[int, list[str]] | None = None
        if self.use_host_addresses:
            found = {fam: self.plugins.node_addresses(fam) for fam in (4, 6)}
            host = {f: list(a) for f, a in found.items() if a is not None} or None
        return make_context(self.config, self.node_name, self.state.node, host,
                            report=self.plugins.report_object)

    def full_sync_period(self) -> float:
        """How often a full sync (re-plan everything, datapath re-reads the kernel
        and repairs drift) runs without another reason: `fullSyncPeriod` when
        set, else max(syncPeriod, 100 x the last full sync's duration) — every
        syncPeriod on small nodes, and never more than ~1% of the time on
        large ones (reading back 10,000 services from iptables-nft takes tens
        of seconds)."""
        configured = self.config.svcproxy.full_sync_period
        if configured is not None:
            return configured
        return max(self.config.kube_proxy.sync_period,
                   FULL_SYNC_COST_FACTOR * self._last_full_duration)

    # -- syncing ------------------------------------------------------------------------

    def sync(self, full: bool = False) -> SyncResult:
        """Plan and apply once. Never raises: the outcome is in the SyncResult."""
        with self._sync_lock:
            with gc_paused():
                result = self._sync(full)
            if result.full:
                trim_heap()
            return result

    def _sync(self, full: bool) -> SyncResult:
        if self._switch is not None:
            self._take_switch()
        started_wall = time.time()
        t0 = self.clock()
        with self._lock:
            dirty = set(self.dirty)
            self.dirty.clear()
            oldest = self._oldest_change
            self._oldest_change = None
            periodic = self._last_full is None or \
                t0 - self._last_full >= self.full_sync_period()
            full = full or self.needs_full or periodic
            self.needs_full = False
        phases: dict[str, float] = {}
        first: ApplyResult | None = None
        try:
            if full and not self.applied:
                first = self._cold_start(phases)
            tp = self.clock()
            with self.bus.lock:
                ctx = self.context()
                if full:
                    plan, delta = self.planner.plan_full(ctx, self.state, self.applied)
                else:
                    plan, delta = self.planner.plan_partial(ctx, self.state, self.applied, dirty)
            t1 = self.clock()
            phases["plan"] = t1 - tp
            apply_result = None
            if full or delta or self._followup:
                # the datapath times its steps with svcproxy.phases.phase();
                # one that reports them in ApplyResult.phases is heard too
                try:
                    with recording() as steps:
                        apply_result = self.plugins.apply(self.datapath, plan, delta, full)
                finally:
                    phases.update({f"apply.{k}": v for k, v in steps.durations().items()})
                self._followup = apply_result.followup
                if first is not None:
                    apply_result = _merged(first, apply_result)
                phases.update({f"apply.{k}": v for k, v in apply_result.phases.items()})
            phases["apply"] = self.clock() - t1
        except Exception as exc:
            with self._lock:
                # Keep everything that was pending and repair with a full sync.
                self.dirty |= dirty
                self.needs_full = True
                if oldest is not None and (self._oldest_change is None
                                           or oldest < self._oldest_change):
                    self._oldest_change = oldest
            reason = f"{type(exc).__name__}: {exc}" if not str(exc).startswith(
                type(exc).__name__) else str(exc)
            self._log_failure(full, reason)
            result = SyncResult(datapath=self.datapath, full=full, ok=False, started=started_wall,
                                duration=self.clock() - t0, error=reason, phases=phases,
                                frontends=len(self.applied),
                                backends=self.applied.backend_count(),
                                services_changed=len(dirty), oldest_change=oldest,
                                plan=self.applied)
            self.last_result = result
            self.plugins.observe_sync(result)
            return result
        self.applied = plan
        if self.failures:
            log.warning("the %s datapath synced again after %d failed attempt%s",
                        self.datapath, self.failures, "" if self.failures == 1 else "s")
            self.failures = 0
            self._failure_logged = ""
        if full:
            self._last_full = t0
            self._last_full_duration = self.clock() - t0
        result = SyncResult(datapath=self.datapath, full=full, ok=True, started=started_wall,
                            duration=self.clock() - t0, frontends=len(plan),
                            backends=plan.backend_count(), created=len(delta.created),
                            updated=len(delta.updated), deleted=len(delta.deleted),
                            services_changed=len(dirty), phases=phases, apply=apply_result,
                            oldest_change=oldest, plan=plan)
        log.info("%s sync (%s): %d frontends, %d backends; +%d ~%d -%d in %.3fs",
                 "full" if full else "partial", self.datapath, result.frontends, result.backends,
                 result.created, result.updated, result.deleted, result.duration)
        self.last_result = result
        self.plugins.observe_sync(result)
        return result

    def priority_services(self) -> set[str]:
        """The Services a cold start programs first (namespace/name keys)."""
        names = self.config.svcproxy.cold_start_services
        if names is not None:
            return {n for n in names if n in self.state.services}
        found = {n for n in DEFAULT_PRIORITY if n in self.state.services}
        found.update(key for key, svc in self.state.services.items()
                     if svc.label(DNS_LABEL[0]) == DNS_LABEL[1])
        return found

    def _cold_start(self, phases: dict[str, float]) -> ApplyResult | None:
        """A datapath's first sync of a large cluster: the API server's and the
        cluster DNS's Services are planned and written (additively) first, so
        they answer long before the whole cluster is programmed (a node with
        thousands of Services could not reach the API server for its first
        sync's duration, kubernetes #133773)."""
        t0 = self.clock()
        with self.bus.lock:
            if len(self.state.services) < self.config.svcproxy.cold_start_min_services:
                return None
            priority = self.priority_services()
            if not priority or len(priority) >= len(self.state.services):
                return None
            plan, _ = self.planner.plan_partial(self.context(), self.state, ServiceMap(),
                                                priority)
        if not plan:
            return None
        t1 = self.clock()
        try:
            with recording() as steps:
                result = self.plugins.apply_first(self.datapath, plan)
        except Exception as exc:
            log.warning("cold start: writing the %d priority Services first with the %s "
                        "datapath failed (the full sync follows): %s", len(priority),
                        self.datapath, exc)
            return None
        finally:
            phases.update({f"first.{k}": v for k, v in steps.durations().items()})
        if result is None:
            return None
        phases["first.plan"] = t1 - t0
        phases["first"] = self.clock() - t0
        slowest = sorted(((v, k) for k, v in phases.items() if k.startswith("first.")),
                         reverse=True)[:6]
        log.info("cold start: %s programmed first (%d frontends) in %.3fs (%s); the other %d "
                 "Services follow", ", ".join(sorted(priority)), len(plan), self.clock() - t0,
                 ", ".join(f"{k.removeprefix('first.')} {v:.3f}s" for v, k in slowest),
                 len(self.state.services) - len(priority))
        return result

    def _log_failure(self, full: bool, reason: str) -> None:
        """Log a failed sync once: the same reason again (the retries of one
        fault) goes to debug level; a different one is logged again."""
        self.failures += 1
        level = logging.DEBUG if reason == self._failure_logged else logging.ERROR
        self._failure_logged = reason
        log.log(level, "%s sync with the %s datapath failed%s; the previous rules stay in "
                "place and it is retried with backoff: %s", "full" if full else "partial",
                self.datapath, f" (attempt {self.failures})" if self.failures > 1 else "",
                reason)

    # -- running --------------------------------------------------------------------------

    def start_runner(self) -> SyncRunner:
        kp = self.config.kube_proxy
        policy = SyncPolicy(kp.min_sync_period, kp.sync_period, now=self.clock())
        self.runner = SyncRunner(lambda: self.sync().ok, policy, clock=self.clock)
        self.runner.start()
        # the first sync after the sources have listed everything runs at once
        self.runner.request()
        return self.runner

    def stop_runner(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
