"""Built-in plugin `tracing`: an OpenTelemetry span for every sync.

- `svcproxy.sync` (one per sync attempt, full or partial): attributes
  svcproxy.datapath, svcproxy.sync.kind, svcproxy.sync.outcome, counts of
  services changed and frontends created/updated/deleted, frontends and
  backends programmed, kernel changes, the error when it failed.
- Children: `plan`, `apply` (timed by a wrapper around svcproxy_apply_plan),
  and under `apply` one span per step the datapath reported in its phases
  (`ipvs`, `addresses`, `helpers.ipset`, `restore`, ...), laid out in the
  order the datapath ran them.
- `svcproxy.event` (one per cluster change: kind, namespace/name, type): the
  sync span that applies a change links to the change's span, so a slow sync
  leads back to what caused it.

Instrumentation lives here — a hook wrapper and the observer hooks — never in
datapath code. Options (`plugins: [{name: tracing, options: {...}}]`):
exporter `none` (default: spans are made, for in-process processors), `console`
(JSON on stdout) or `otlp` (needs the optional `otlp` extra:
opentelemetry-exporter-otlp-proto-http; `endpoint` defaults to the exporter's
own, http://localhost:4318/v1/traces); `serviceName` (default svcproxy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, Status, StatusCode

from svcproxy import hookimpl
from svcproxy.bus import Event
from svcproxy.datapath import ApplyResult, SyncResult
from svcproxy.errors import PluginError

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp")
#: links kept per sync (a burst of changes links its first changes)
MAX_LINKS = 128


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class TracingPlugin:
    def __init__(self) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": "svcproxy"}))
        self.tracer = self.provider.get_tracer("svcproxy")
        self.lock = threading.Lock()
        self.pending: list[trace.SpanContext] = []
        self.dropped_links = 0
        self.apply_window: tuple[int, int] | None = None

    @hookimpl
    def svcproxy_configure_plugin(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - {"exporter", "endpoint", "serviceName"})
        if unknown:
            raise PluginError(f"tracing: unknown option {unknown[0]!r} (options: endpoint, "
                              "exporter, serviceName)")
        exporter = options.get("exporter", "none")
        if exporter not in EXPORTERS:
            raise PluginError(f"tracing: exporter must be one of {', '.join(EXPORTERS)} "
                              f"(got {exporter!r})")
        name = str(options.get("serviceName", "svcproxy"))
        self.provider = TracerProvider(resource=Resource.create({"service.name": name}))
        self.tracer = self.provider.get_tracer("svcproxy")
        if exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                raise PluginError("tracing: exporter otlp needs the OTLP exporter package "
                                  "(pip install 'svcproxy[otlp]')") from None
            endpoint = options.get("endpoint")
            otlp = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
            self.provider.add_span_processor(BatchSpanProcessor(otlp))

    @hookimpl
    def svcproxy_stop_proxy(self) -> None:
        self.provider.shutdown()

    @hookimpl
    def svcproxy_observe_event(self, event: Event) -> None:
        obj = event.object
        name = getattr(obj, "key", getattr(obj, "name", ""))
        span = self.tracer.start_span("svcproxy.event", attributes={
            "svcproxy.event.type": str(event.type),
            "svcproxy.event.kind": type(obj).__name__,
            "svcproxy.event.object": str(name),
            "svcproxy.event.source": event.source})
        span.end()
        with self.lock:
            if len(self.pending) < MAX_LINKS:
                self.pending.append(span.get_span_context())
            else:
                self.dropped_links += 1

    @hookimpl(wrapper=True)
    def svcproxy_apply_plan(self) -> Generator[None, ApplyResult | None, ApplyResult | None]:
        start = time.time_ns()
        try:
            return (yield)
        finally:
            self.apply_window = (start, time.time_ns())

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        with self.lock:
            links = [Link(c) for c in self.pending]
            dropped, self.dropped_links = self.dropped_links, 0
            if result.ok:
                self.pending = []
        kind = "full" if result.full else "partial"
        attrs: dict[str, Any] = {
            "svcproxy.datapath": result.datapath, "svcproxy.sync.kind": kind,
            "svcproxy.sync.outcome": "ok" if result.ok else "error",
            "svcproxy.services_changed": result.services_changed,
            "svcproxy.frontends": result.frontends, "svcproxy.backends": result.backends,
            "svcproxy.frontends.created": result.created,
            "svcproxy.frontends.updated": result.updated,
            "svcproxy.frontends.deleted": result.deleted,
            "svcproxy.changes_linked": len(links) + dropped}
        if result.apply is not None:
            attrs["svcproxy.kernel_changes"] = result.apply.changes
            attrs["svcproxy.drift_repaired"] = result.apply.repaired
        start = _ns(result.started)
        end = start + _ns(result.duration)
        root = self.tracer.start_span(f"svcproxy.sync {kind}", start_time=start,
                                      attributes=attrs, links=links)
        if not result.ok:
            root.set_status(Status(StatusCode.ERROR, result.error))
            attrs["svcproxy.error"] = result.error
            root.set_attribute("svcproxy.error", result.error)
        ctx = trace.set_span_in_context(root)
        cursor = start
        plan_s = result.phases.get("plan")
        if plan_s is not None:
            self.tracer.start_span("plan", context=ctx, start_time=cursor).end(
                end_time=cursor + _ns(plan_s))
            cursor += _ns(plan_s)
        window, self.apply_window = self.apply_window, None
        if "apply" in result.phases or window is not None:
            a_start, a_end = window if window is not None else (
                cursor, cursor + _ns(result.phases.get("apply", 0.0)))
            apply_span = self.tracer.start_span("apply", context=ctx, start_time=a_start,
                                                attributes={"svcproxy.datapath":
                                                            result.datapath})
            actx = trace.set_span_in_context(apply_span)
            # top-level steps in the order reported; "helpers.ipset" is a step
            # of "helpers" and is laid out inside it
            step = a_start
            spans: dict[str, tuple[Any, int]] = {}
            for phase, seconds in result.phases.items():
                if not phase.startswith("apply."):
                    continue
                name = phase[len("apply."):]
                parent, _, sub = name.partition(".")
                if sub and parent in spans:
                    pspan, pcursor = spans[parent]
                    s = self.tracer.start_span(sub, context=trace.set_span_in_context(pspan),
                                               start_time=pcursor)
                    s.end(end_time=pcursor + _ns(seconds))
                    spans[parent] = (pspan, pcursor + _ns(seconds))
                    continue
                s = self.tracer.start_span(name, context=actx, start_time=step)
                s.end(end_time=step + _ns(seconds))
                spans[name] = (s, step)
                step += _ns(seconds)
            apply_span.end(end_time=a_end)
        root.end(end_time=max(end, cursor))
