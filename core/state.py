"""The change tracker: the current cluster objects and which Services changed.

`ClusterState.apply(event)` returns a `Change`: the Service keys whose plan may
differ, and whether this node changed (which re-plans everything). An event that
does not change an object's content (a resync, a status-only bump of the
resourceVersion) changes nothing, so it costs no sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .model import EndpointSlice, Node, Service

if TYPE_CHECKING:
    from .bus import Event

#: EndpointSlice annotation with the time of the change that caused it.
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass
class Change:
    services: set[str] = field(default_factory=set)
    node: bool = False
    #: monotonic time the change was received
    at: float = field(default_factory=time.monotonic)

    def __bool__(self) -> bool:
        return bool(self.services) or self.node


class ClusterState:
    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self.services: dict[str, Service] = {}
        self.slices: dict[str, EndpointSlice] = {}
        self._slices_by_service: dict[str, dict[str, EndpointSlice]] = {}
        self.nodes: dict[str, Node] = {}

    @property
    def node(self) -> Node | None:
        return self.nodes.get(self.node_name)

    def slices_for(self, service_key: str) -> list[EndpointSlice]:
        return list(self._slices_by_service.get(service_key, {}).values())

    def apply(self, event: Event) -> Change:
        from .bus import EventType

        obj = event.object
        deleted = event.type == EventType.DELETED
        change = Change(at=event.received)
        if isinstance(obj, Service):
            old = self.services.get(obj.key)
            if deleted:
                if old is not None:
                    del self.services[obj.key]
                    change.services.add(obj.key)
            elif old != obj:
                self.services[obj.key] = obj
                change.services.add(obj.key)
        elif isinstance(obj, EndpointSlice):
            old_slice = self.slices.get(obj.key)
            if old_slice is not None and (deleted or old_slice != obj):
                self._slices_by_service.get(old_slice.service_key, {}).pop(obj.key, None)
                del self.slices[obj.key]
                change.services.add(old_slice.service_key)
            if not deleted and old_slice != obj and obj.service_name:
                self.slices[obj.key] = obj
                self._slices_by_service.setdefault(obj.service_key, {})[obj.key] = obj
                change.services.add(obj.service_key)
        elif isinstance(obj, Node):
            old_node = self.nodes.get(obj.name)
            if deleted:
                if old_node is not None:
                    del self.nodes[obj.name]
                    change.node = obj.name == self.node_name
            elif old_node != obj:
                self.nodes[obj.name] = obj
                change.node = obj.name == self.node_name
        return change
