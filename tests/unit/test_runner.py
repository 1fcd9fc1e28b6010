"""Bounded-frequency timing with an injected clock, and the APScheduler driver."""

from __future__ import annotations

import itertools
import threading

import pytest

from svcproxy.runner import SyncPolicy, SyncRunner


def test_first_run_is_due_at_once_when_requested() -> None:
    p = SyncPolicy(1.0, 30.0, now=0.0)
    assert p.next_run(0.0) == 30.0  # nothing requested: only the periodic sync
    p.request(0.0)
    assert p.next_run(0.0) == 0.0


def test_burst_of_two_then_min_interval() -> None:
    p = SyncPolicy(min_interval=2.0, max_interval=30.0, burst=2, now=0.0)
    for t in (0.0, 0.1):  # kube-proxy's burstSyncs=2
        p.request(t)
        assert p.next_run(t) == t
        p.ran(t, ok=True)
    p.request(0.2)
    # the bucket refills one token per min_interval from t=0 (0.1 tokens by t=0.2),
    # so the third run waits until a whole token is there: t=2.0
    assert p.next_run(0.2) == pytest.approx(2.0)


def test_min_interval_spaces_steady_requests() -> None:
    p = SyncPolicy(min_interval=1.0, max_interval=60.0, burst=2, now=0.0)
    runs: list[float] = []
    t = 0.0
    while t < 10.0:
        p.request(t)
        due = p.next_run(t)
        if due <= t:
            p.ran(t, ok=True)
            runs.append(t)
        t = round(t + 0.1, 3)
    # a request every 100ms for 10s: 2 burst runs, then one per second
    assert len(runs) in (11, 12)
    gaps = [b - a for a, b in itertools.pairwise(runs[2:])]
    assert all(g >= 0.99 for g in gaps)


def test_requests_coalesce() -> None:
    p = SyncPolicy(min_interval=5.0, max_interval=60.0, burst=1, now=0.0)
    p.request(0.0)
    p.ran(0.0, ok=True)
    for t in (0.5, 1.0, 1.5, 2.0):
        p.request(t)
    assert p.next_run(2.0) == pytest.approx(5.0)  # one sync covers all four
    p.ran(5.0, ok=True)
    assert not p.pending and p.next_run(5.0) == 65.0


def test_max_interval_forces_a_sync_without_changes() -> None:
    p = SyncPolicy(min_interval=1.0, max_interval=30.0, now=100.0)
    assert p.next_run(100.0) == 130.0
    p.ran(130.0, ok=True)
    assert p.next_run(131.0) == 160.0


def test_zero_min_interval_never_waits() -> None:
    p = SyncPolicy(min_interval=0.0, max_interval=30.0, now=0.0)
    for t in (0.0, 0.001, 0.002, 0.003):
        p.request(t)
        assert p.next_run(t) == t
        p.ran(t, ok=True)


def test_failure_backs_off_exponentially_up_to_sync_period() -> None:
    p = SyncPolicy(min_interval=1.0, max_interval=30.0, burst=100, now=0.0)
    p.request(0.0)
    delays = []
    t = 0.0
    for _ in range(7):
        p.ran(t, ok=False)
        due = p.next_run(t)
        delays.append(due - t)
        t = due
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert p.pending
    p.ran(t, ok=True)
    assert p.failures == 0 and p.retry_at is None and not p.pending


def test_backoff_starts_at_min_sync_period() -> None:
    p = SyncPolicy(min_interval=5.0, max_interval=300.0, now=0.0)
    p.ran(0.0, ok=False)
    assert p.backoff() == 5.0


def test_runner_syncs_on_request_and_retries_failures() -> None:
    calls: list[bool] = []
    done = threading.Event()
    outcomes = iter([True, False, True])

    def sync() -> bool:
        ok = next(outcomes, True)
        calls.append(ok)
        if len(calls) == 3:
            done.set()
        return ok

    policy = SyncPolicy(min_interval=0.0, max_interval=3600.0, retry_base=0.05)
    runner = SyncRunner(sync, policy)
    runner.start()
    try:
        runner.request()
        # the first sync succeeds; the second request fails and is retried
        for _ in range(100):
            if calls:
                break
            threading.Event().wait(0.02)
        runner.request()
        assert done.wait(10), f"only {calls} ran"
    finally:
        runner.stop()
    assert calls[:3] == [True, False, True]


def test_runner_survives_an_exception_in_sync() -> None:
    done = threading.Event()
    state = {"n": 0}

    def sync() -> bool:
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom")
        done.set()
        return True

    runner = SyncRunner(sync, SyncPolicy(0.0, 3600.0, retry_base=0.05))
    runner.start()
    try:
        runner.request()
        assert done.wait(10)
    finally:
        runner.stop()


def test_a_request_made_during_a_sync_is_never_lost() -> None:
    """Changes that arrive while a sync runs book the next sync from inside the
    running job; APScheduler must not drop that booking when it retires the
    finished job."""
    runs: list[int] = []
    done = threading.Event()
    runner: SyncRunner

    def sync() -> bool:
        runs.append(len(runs))
        if len(runs) < 30:
            runner.request()
        else:
            done.set()
        return True

    runner = SyncRunner(sync, SyncPolicy(0.0, 3600.0))
    runner.start()
    try:
        runner.request()
        assert done.wait(20), f"stalled after {len(runs)} syncs"
    finally:
        runner.stop()


def test_request_during_a_sync_stays_pending() -> None:
    p = SyncPolicy(min_interval=0.0, max_interval=60.0, now=0.0)
    p.request(0.0)
    covered = p.requests
    p.request(0.5)  # arrives while the sync that started at 0.0 runs
    p.ran(0.0, ok=True, covered=covered)
    assert p.pending and p.next_run(1.0) == 1.0
    p.ran(1.0, ok=True, covered=p.requests)
    assert not p.pending
