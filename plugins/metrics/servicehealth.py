"""healthCheckNodePort servers: one HTTP server per LoadBalancer Service with
externalTrafficPolicy=Local, as kube-proxy runs them
(pkg/proxy/healthcheck/service_health.go). Cloud load balancers probe them to
send traffic only to nodes that have a ready local endpoint.

Any path answers: 200 when the node has ready local endpoints and the proxy is
healthy, else 503; header X-Load-Balancing-Endpoint-Weight: <count>; body
{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": bool}.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from svcproxy.ir import ServiceMap

log = logging.getLogger(__name__)


class _DualStackServer(ThreadingHTTPServer):
    """One socket for both families: [::] with IPV6_V6ONLY off."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def listen(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Listen on `host`; an unspecified address (0.0.0.0 or ::) means every
    address of both families, as kube-proxy's health server on a dual-stack
    node — IPv4 alone where the kernel has no IPv6."""
    if host in ("0.0.0.0", "::", ""):
        try:
            return _DualStackServer(("::", port), handler)
        except OSError as exc:
            if host == "::" or exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    if ":" in host:
        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6
        return Server6((host, port), handler)
    return ThreadingHTTPServer((host, port), handler)


class _Server:
    def __init__(self, port: int, host: str, owner: ServiceHealthServers) -> None:
        self.service = ("", "")
        self.local = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.answer(server, self)

        self.httpd = listen(host, port, Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name=f"healthcheck-{port}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ServiceHealthServers:
    def __init__(self, proxy_healthy: Callable[[], bool], host: str = "") -> None:
        self.proxy_healthy = proxy_healthy
        self.host = host
        self.servers: dict[int, _Server] = {}
        self.failed: set[int] = set()
        self.lock = threading.Lock()

    def update(self, plan: ServiceMap) -> None:
        """Serve exactly the health check node ports of `plan`'s services."""
        wanted: dict[int, tuple[tuple[str, str], int]] = {}
        for key, summary in plan.services.items():
            if summary.health_check_node_port:
                ns, _, name = key.partition("/")
                wanted[summary.health_check_node_port] = ((ns, name),
                                                          summary.local_ready_endpoints)
        with self.lock:
            for port in [p for p in self.servers if p not in wanted]:
                self.servers.pop(port).close()
            for port, (service, local) in wanted.items():
                server = self.servers.get(port)
                if server is None:
                    try:
                        server = self.servers[port] = _Server(port, self.host, self)
                        self.failed.discard(port)
                    except OSError as exc:
                        if port not in self.failed:
                            log.error("cannot serve the health check node port %d of %s/%s: %s",
                                      port, service[0], service[1], exc)
                            self.failed.add(port)
                        continue
                server.service, server.local = service, local

    def close(self) -> None:
        with self.lock:
            for server in self.servers.values():
                server.close()
            self.servers.clear()

    def answer(self, server: _Server, h: BaseHTTPRequestHandler) -> None:
        healthy = self.proxy_healthy()
        ns, name = server.service
        body = json.dumps({"service": {"namespace": ns, "name": name},
                           "localEndpoints": server.local,
                           "serviceProxyHealthy": healthy}).encode()
        h.send_response(200 if server.local > 0 and healthy else 503)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Content-Type-Options", "nosniff")
        h.send_header("X-Load-Balancing-Endpoint-Weight", str(server.local))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
