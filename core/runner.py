"""The bounded-frequency sync runner (kube-proxy's BoundedFrequencyRunner).

A sync runs soon after a change is requested, but never more often than
minSyncPeriod allows (with a burst of 2, as kube-proxy), and at least every
syncPeriod even with no change. A failed sync is retried with exponential
backoff. Bursts of requests coalesce into one sync.

`SyncPolicy` holds the timing decisions as pure arithmetic on an injected
clock, so tests check them without sleeping; `SyncRunner` drives it with an
APScheduler background scheduler.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class SyncPolicy:
    """When the next sync is due. All times are seconds on one monotonic clock."""

    def __init__(self, min_interval: float, max_interval: float, *, burst: int = 2,
                 retry_base: float = 1.0, now: float = 0.0) -> None:
        if max_interval <= 0:
            raise ValueError("max_interval must be > 0")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.burst = max(1, burst)
        self.retry_base = retry_base
        self.tokens = float(self.burst)
        self._refilled = now
        self.last_run: float | None = None
        self._started = now
        self.pending = False
        self.failures = 0
        self.retry_at: float | None = None
        #: requests counted so far; a sync covers those made before it started
        self.requests = 0

    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self.tokens = float(self.burst)
        elif now > self._refilled:
            self.tokens = min(float(self.burst),
                              self.tokens + (now - self._refilled) / self.min_interval)
        self._refilled = max(self._refilled, now)

    def request(self, now: float) -> None:
        """A change wants to be synced."""
        self.pending = True
        self.requests += 1

    def next_run(self, now: float) -> float:
        """The absolute time the next sync should start (may be <= now: run now)."""
        self._refill(now)
        deadline = (self.last_run if self.last_run is not None else self._started) \
            + self.max_interval
        if self.retry_at is not None:
            deadline = min(deadline, max(self.retry_at, self._token_time(now)))
        elif self.pending:
            deadline = min(deadline, self._token_time(now))
        return deadline

    def _token_time(self, now: float) -> float:
        if self.min_interval <= 0 or self.tokens >= 1:
            return now
        return now + (1 - self.tokens) * self.min_interval

    def ran(self, now: float, ok: bool, covered: int | None = None) -> None:
        """Record a sync that started at `now` and saw the first `covered`
        requests (default: all so far). Requests that came in while it ran stay
        pending."""
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1)
        self.last_run = now
        if ok:
            self.pending = self.requests > (self.requests if covered is None else covered)
            self.failures = 0
            self.retry_at = None
        else:
            self.failures += 1
            self.pending = True
            self.retry_at = now + self.backoff()

    def backoff(self) -> float:
        """Delay before retrying after `failures` consecutive failures: starts at
        max(minSyncPeriod, 1s) and doubles, capped at syncPeriod."""
        base = max(self.min_interval, self.retry_base)
        return float(min(self.max_interval, base * 2 ** max(0, self.failures - 1)))


def preload() -> None:
    """Import APScheduler ahead of the first sync (`svcproxy run` calls it
    while the initial lists are in flight): the import is ~25 ms natively,
    over a second in an emulated VM, and it stood between the lists and a
    new node's first write."""
    import apscheduler.executors.pool
    import apscheduler.schedulers.background  # noqa: F401


class SyncRunner:
    """Runs `sync_fn` on an APScheduler background thread as SyncPolicy dictates.

    `sync_fn` returns True on success. Requests from any thread are safe."""

    JOB_PREFIX = "svcproxy-sync-"

    def __init__(self, sync_fn: Callable[[], bool], policy: SyncPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.sync_fn = sync_fn
        self.policy = policy
        self.clock = clock
        self._lock = threading.Lock()
        self._running = False
        self._scheduled: float | None = None
        # Each booking gets its own job id: APScheduler removes a finished date
        # job by id after running it, which would also remove a booking made
        # with the same id from inside that run.
        self._token = 0
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.UTC)

    def start(self) -> None:
        self.scheduler.start()
        self._schedule()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def request(self) -> None:
        """Ask for a sync soon (coalesced with other requests). A request made
        while a sync runs books another one after it."""
        with self._lock:
            self.policy.request(self.clock())
            if not self._running:
                self._schedule_locked()

    def _schedule(self) -> None:
        with self._lock:
            self._schedule_locked()

    def _schedule_locked(self) -> None:
        if not self.scheduler.running:
            return
        now = self.clock()
        at = self.policy.next_run(now)
        if self._scheduled is not None and self._scheduled <= at:
            return  # an earlier (or equal) run is already booked
        self._scheduled = at
        previous = self._token
        self._token += 1
        run_date = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, at - now))
        self.scheduler.add_job(self._run, "date", args=(self._token,), run_date=run_date,
                               id=f"{self.JOB_PREFIX}{self._token}")
        with contextlib.suppress(Exception):  # already ran or removed: nothing to cancel
            self.scheduler.remove_job(f"{self.JOB_PREFIX}{previous}")

    def _run(self, token: int) -> None:
        with self._lock:
            if token != self._token:
                return  # superseded by an earlier booking that already ran
            self._running = True
            self._scheduled = None
            covered = self.policy.requests
        started = self.clock()
        ok = False
        try:
            ok = bool(self.sync_fn())
        except Exception:  # the runner must survive any sync failure and retry
            log.exception("sync failed")
        finally:
            with self._lock:
                self._running = False
                self.policy.ran(started, ok, covered)
                if not ok:
                    # the sync logged why (once per fault); the retries are quiet
                    log.log(logging.WARNING if self.policy.failures == 1 else logging.DEBUG,
                            "sync failed; retrying in %.1fs (attempt %d), backing off up "
                            "to %.0fs", self.policy.backoff(), self.policy.failures,
                            self.policy.max_interval)
                self._schedule_locked()
