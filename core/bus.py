"""Events: what sources report and how they reach the state and the plugins.

A source (manifest directory, Kubernetes watch) turns each change into an
`Event` and publishes it on the `EventBus`. The bus shows it to observer
plugins, applies it to the cluster state and tells the proxy which Services
changed. The core cannot tell sources apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from .model import ClusterObject, WatchedObject

if TYPE_CHECKING:
    from .manager import PluginHost
    from .state import Change, ClusterState


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class Event:
    type: EventType
    object: ClusterObject | WatchedObject
    #: which source reported it ("manifests:/path", "kubernetes")
    source: str = ""
    #: monotonic time the event was received
    received: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        return self.object.kind

    def __str__(self) -> str:
        return f"{self.type} {self.kind} {self.object.key}"


class EventBus:
    """Serialises events into the state; `on_change` hears about real changes."""

    def __init__(self, state: ClusterState, plugins: PluginHost,
                 on_change: Callable[[Change], None]) -> None:
        self.state = state
        self.plugins = plugins
        self.on_change = on_change
        self.lock = threading.RLock()
        self._synced: set[str] = set()
        self._ready = threading.Event()
        self._expected: set[str] = set()

    def publish(self, event: Event) -> None:
        self.plugins.observe_event(event)
        with self.lock:
            change = self.state.apply(event)
        if change:
            self.on_change(change)

    # Sources announce when their initial listing is complete: nothing is synced
    # before every source has (kube-proxy waits for its informer caches too).

    def expect(self, source: str) -> None:
        self._expected.add(source)

    def mark_synced(self, source: str) -> None:
        self._synced.add(source)
        if self._expected <= self._synced:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        if not self._expected:
            return True
        return self._ready.wait(timeout)
