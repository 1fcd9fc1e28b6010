"""Built-in plugin `metrics`: Prometheus /metrics on metricsBindAddress
(default 127.0.0.1:10249, prom.py), kube-proxy's /healthz and /livez on
healthzBindAddress (default 0.0.0.0:10256) and the healthCheckNodePort servers
of Local-policy LoadBalancer Services (servicehealth.py), with kube-proxy's
semantics (pkg/proxy/healthcheck/proxy_health.go).

- Unhealthy iff an update was queued (a change arrived) and no sync has
  succeeded for longer than healthTimeout = 2 x syncPeriod. No pending update
  means healthy, also during start-up.
- /livez: 200 when healthy, else 503. /healthz: the same and the Node must be
  eligible (it exists, is not being deleted, and has no
  ToBeDeletedByClusterAutoscaler taint).
- JSON body {"lastUpdated", "currentTime", "healthy", "status": {"IPv4": ...}}
  (/healthz adds "nodeEligible"); on 200 lastUpdated is "now", as kube-proxy
  reports it for backwards compatibility.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from svcproxy import hookimpl
from svcproxy.bus import Event, EventType
from svcproxy.config import Config
from svcproxy.datapath import SyncResult
from svcproxy.model import EndpointSlice, Node, Service

from .prom import ProxyMetrics
from .servicehealth import ServiceHealthServers, listen

log = logging.getLogger(__name__)

AUTOSCALER_TAINT = "ToBeDeletedByClusterAutoscaler"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


class ProxyHealth:
    """kube-proxy's ProxyHealthServer state, on an injectable wall clock."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time,
                 families: Sequence[str] = ("IPv4",)) -> None:
        self.timeout = timeout
        self.clock = clock
        self.lock = threading.Lock()
        self.last_updated: dict[str, float] = {}
        self.oldest_pending: dict[str, float] = {}
        self.families = list(families)
        self.node: Node | None = None
        self.node_seen = False

    def queued_update(self) -> None:
        with self.lock:
            now = self.clock()
            for fam in self.families:
                self.oldest_pending.setdefault(fam, now)

    def updated(self) -> None:
        with self.lock:
            now = self.clock()
            for fam in self.families:
                self.last_updated[fam] = now
                self.oldest_pending.pop(fam, None)

    def status(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            now = self.clock()
            per: dict[str, Any] = {}
            healthy = True
            for fam in self.families:
                pending = self.oldest_pending.get(fam)
                ok = pending is None or now - pending <= self.timeout
                healthy = healthy and ok
                per[fam] = {"lastUpdated": _rfc3339(self.last_updated.get(fam, 0.0)),
                            "healthy": ok}
            last = max(self.last_updated.values(), default=0.0)
            body = {"lastUpdated": _rfc3339(now if healthy else last),
                    "currentTime": _rfc3339(now), "healthy": healthy, "status": per}
            return healthy, body

    def node_eligible(self) -> bool:
        node = self.node
        if node is None:
            return False
        return not node.deleting and not any(k == AUTOSCALER_TAINT for k, _ in node.taints)


def _serve_http(address: str, name: str,
                handle: Callable[[BaseHTTPRequestHandler], None]
                ) -> tuple[ThreadingHTTPServer, str] | None:
    host, port = _split(address)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            handle(self)

    try:
        server = listen(host, port, Handler)
    except OSError as exc:
        log.error("cannot serve %s on %s: %s", name, address, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    bound = f"[{host}]" if ":" in host else host
    return server, f"{bound}:{server.server_address[1]}"


class MetricsPlugin:
    def __init__(self) -> None:
        self.config = Config()
        self.health = ProxyHealth(60.0)
        self.metrics = ProxyMetrics()
        self.node_name = ""
        self.servers: list[ThreadingHTTPServer] = []
        #: where /healthz and /metrics are served (host:port, after binding)
        self.address = ""
        self.metrics_address = ""
        self.service_health = ServiceHealthServers(lambda: self.health.status()[0])

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config) -> None:
        self.config = config
        self.health.timeout = config.kube_proxy.health_timeout

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str, previous: str) -> None:
        self.metrics.switched(datapath, previous)

    @hookimpl
    def svcproxy_start_proxy(self, config: Config, datapath: str,
                             skipped: list[tuple[str, str]], node: str, host: Any) -> None:
        self.node_name = node
        self.metrics.started(datapath, skipped)
        self.metrics.add_samples(host.collect_metrics)
        address = config.kube_proxy.healthz_bind_address
        if address:
            served = _serve_http(address, "healthz", self.serve)
            if served:
                self.servers.append(served[0])
                self.address = served[1]
                log.info("serving /healthz and /livez on %s", self.address)
        address = config.kube_proxy.metrics_bind_address
        if address:
            served = _serve_http(address, "metrics", self.serve_metrics)
            if served:
                self.servers.append(served[0])
                self.metrics_address = served[1]
                log.info("serving /metrics on %s", self.metrics_address)
        # kube-proxy marks itself updated when its sync loop starts
        self.health.updated()

    @hookimpl
    def svcproxy_stop_proxy(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers = []
        self.service_health.close()

    @hookimpl
    def svcproxy_observe_event(self, event: Event) -> None:
        obj = event.object
        if isinstance(obj, Node):
            if self.node_name and obj.name != self.node_name:
                return
            self.health.node = None if event.type == EventType.DELETED else obj
            return
        if isinstance(obj, EndpointSlice):
            self.metrics.endpoint_change(obj)
        elif isinstance(obj, Service):
            self.metrics.service_change()
        self.health.queued_update()

    @hookimpl
    def svcproxy_observe_source_error(self, source: str, resource: str) -> None:
        self.metrics.source_errors.labels(source, resource).inc()

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        if result.ok:
            self.health.updated()
        self.metrics.sync(result)
        if result.ok and result.plan is not None and self.servers:
            self.service_health.update(result.plan)

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path not in ("/healthz", "/livez"):
            h.send_error(404)
            return
        healthy, body = self.health.status()
        if path == "/healthz":
            eligible = self.health.node_eligible()
            body["nodeEligible"] = eligible
            healthy = healthy and eligible
        code = 200 if healthy else 503
        (self.metrics.healthz if path == "/healthz" else self.metrics.livez).labels(
            str(code)).inc()
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Content-Type-Options", "nosniff")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def serve_metrics(self, h: BaseHTTPRequestHandler) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = h.path.split("?", 1)[0]
        # only /metrics: the plan `svcproxy status` labels the kernel with names
        # every service and endpoint, and is served on a root-only unix socket
        # (core/status.py), not on this (often 0.0.0.0) address
        if path == "/metrics":
            data = generate_latest(self.metrics.registry)
            content_type = CONTENT_TYPE_LATEST
        else:
            h.send_error(404)
            return
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
