"""Sync phases, timed once, for everyone: `with phase("read"):` in a datapath
records how long its read took, nested under the phase the core is in
("apply"), so the sync's phases come out as "plan", "apply", "apply.read",
"apply.helpers.ipset" ... with their start times. Metrics observe the
durations (svcproxy_sync_phase_duration_seconds) and tracing turns the
timeline into child spans, without either parsing anything a datapath made up.

Outside a sync (`recording()` not active) `phase()` costs one context-variable
lookup and records nothing. Work on other threads is not recorded (a context
variable does not follow a thread); time what the sync waits for instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Phase:
    #: dotted path: "apply.helpers.ipset" is "ipset" inside "helpers" inside "apply"
    name: str
    #: time.perf_counter() at its start, and its length, in seconds
    start: float
    duration: float


@dataclass
class Recorder:
    phases: list[Phase] = field(default_factory=list)
    _stack: list[str] = field(default_factory=list)

    def durations(self) -> dict[str, float]:
        """{path: seconds}, in start order; a phase entered twice adds up."""
        out: dict[str, float] = {}
        for p in sorted(self.phases, key=lambda p: p.start):
            out[p.name] = out.get(p.name, 0.0) + p.duration
        return out


_current: ContextVar[Recorder | None] = ContextVar("svcproxy_phases", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record the phases entered inside the block (the core, around a sync)."""
    recorder = Recorder()
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase `name`, inside whatever phase encloses it."""
    recorder = _current.get()
    if recorder is None:
        yield
        return
    path = ".".join((*recorder._stack, name))
    recorder._stack.append(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        recorder._stack.pop()
        recorder.phases.append(Phase(path, start, time.perf_counter() - start))
