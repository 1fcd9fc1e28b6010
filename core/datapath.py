"""What datapaths answer and what observers see: probe results, apply results
and the record of one sync."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ir import ServiceMap


@dataclass(frozen=True)
class ProbeResult:
    """Whether a datapath can run on this node; `reason` says why not, in words a
    user can act on ("ip_vs kernel module not loaded and cannot be loaded")."""

    usable: bool
    reason: str = ""

    @classmethod
    def ok(cls) -> ProbeResult:
        return cls(True)

    @classmethod
    def unusable(cls, reason: str) -> ProbeResult:
        return cls(False, reason)


@dataclass(frozen=True)
class WatchedKind:
    """A resource kind a plugin wants delivered as events besides Services,
    EndpointSlices and Nodes (svcproxy_watch_kinds): the Kubernetes source lists
    and watches it (cluster-wide, through the custom-objects API), the manifest
    source reads it from files. Its objects reach svcproxy_observe_event only."""

    kind: str  # "IPAddressPool"
    group: str  # "metallb.io"
    version: str  # "v1beta1"
    plural: str  # "ipaddresspools"
    #: API dict -> an object with `kind` and `key`; raises ObjectError on bad input
    parse: Callable[[Any], Any] = field(compare=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass(frozen=True)
class ApplyResult:
    """What a datapath did in one apply."""

    #: kernel objects (virtual servers, rules, chains, ...) written or removed
    changes: int = 0
    #: drift found and repaired by a full apply
    repaired: int = 0
    #: datapath-specific phase durations in seconds ("restore", "ipset", ...)
    phases: dict[str, float] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    #: the datapath has deferred work (e.g. real servers draining): call apply
    #: on the next sync even when nothing changed
    followup: bool = False


@dataclass(frozen=True)
class SyncResult:
    """One sync attempt, as observers (metrics, tracing, logs) see it."""

    datapath: str
    full: bool
    ok: bool
    started: float  # wall-clock seconds since the epoch
    duration: float
    frontends: int = 0
    backends: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    services_changed: int = 0
    error: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    apply: ApplyResult | None = None
    #: monotonic time of the oldest unsynced change this sync covered, if any
    #: (for network-programming latency)
    oldest_change: float | None = None
    #: the plan the kernel now holds (the new one after success, the previous
    #: one after a failure), for observers that count things in it
    plan: ServiceMap | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class MetricSample:
    """One value a plugin adds to /metrics at scrape time
    (svcproxy_collect_metrics): a gauge or a counter, with its labels."""

    name: str
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    kind: str = "gauge"  # or "counter"

    def key(self) -> tuple[Any, ...]:
        return (self.name, self.kind, tuple(sorted(self.labels)))


@dataclass(frozen=True)
class CheckItem:
    """One line of `svcproxy check`: a prerequisite or health fact, its state
    ("ok", "warn" or "fail"), what was found, and the command that fixes it."""

    name: str
    state: str
    detail: str
    fix: str = ""
    #: datapaths this problem stops from running (exit code 1 when it is the
    #: configured mode)
    blocks: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "detail": self.detail,
                "fix": self.fix, "blocks": list(self.blocks)}
