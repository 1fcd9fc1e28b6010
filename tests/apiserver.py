"""An in-process HTTP server speaking the Kubernetes API's list/watch wire
protocol for Services, EndpointSlices and Nodes, so svcproxy's real API client
(core/sources/kubeclient.py) can be tested without a kube-apiserver binary.

What it implements, as the API server does:
- list: `{"kind": "ServiceList", "metadata": {"resourceVersion", "continue"},
  "items": [...]}` with items lacking kind/apiVersion, paging with
  `limit`/`continue`, label selectors (`k`, `!k`, `k=v`, `k!=v`) and the
  `metadata.name=` field selector;
- watch: a chunked stream of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
  "object": ...}` lines from `resourceVersion`, bookmarks when asked, an ERROR
  event with code 410 for an expired resourceVersion, `timeoutSeconds`;
- POST of core/v1 Events;
- authentication: a bearer token (401 without it, as the API server answers
  an unauthenticated request when anonymous auth is off), and TLS with an
  optional required client certificate (`tls=`).

Faults a test can inject: answer the next N requests with a status (500, 429
with Retry-After, 410), drop a watch stream in the middle of an event, delay
responses, "restart" (close all watches, jump the resourceVersion, forget
history), and go away altogether for a while (`go_away`: every connection
closed, new ones refused, until `come_back` listens on the same port again).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

RESOURCES = {
    "/api/v1/services": ("services", "Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices", "EndpointSlice",
                                                 "discovery.k8s.io/v1"),
    "/api/v1/nodes": ("nodes", "Node", "v1"),
    "/apis/metallb.io/v1beta1/ipaddresspools": ("ipaddresspools", "IPAddressPool",
                                               "metallb.io/v1beta1"),
}


def key_of(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.rstrip("=")) != v:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Fault:
    path: str
    status: int
    count: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    watch_only: bool = False


@dataclass
class TLS:
    """The server's certificate and key (PEM files), and the CA whose client
    certificates it requires (None: no client certificate asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class FakeAPIServer:
    def __init__(self, tls: TLS | None = None, token: str | None = "test-token") -> None:
        self.tls = tls
        #: the bearer token a request must carry (None: any request is served)
        self.token = token
        self.cond = threading.Condition()
        self.rv = 1000
        self.min_rv = 0  # watches/continues from before this get 410
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            "services": {}, "endpointslices": {}, "nodes": {}, "ipaddresspools": {}}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.posted_events: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.faults: list[Fault] = []
        self.delay = 0.0
        self.drop_watch_mid_event = 0  # drop this many watch streams mid-event
        self.bookmark_interval = 0.5
        self.generation = 0  # bumped by restart(); open watches end
        server = self

        self.connections: set[Any] = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                if server.tls is not None:
                    self.connection.settimeout(10)
                    self.connection.do_handshake()  # here, not in the accepting thread
                    self.connection.settimeout(None)
                with server.cond:
                    server.connections.add(self.connection)

            def finish(self) -> None:
                with server.cond:
                    server.connections.discard(self.connection)
                super().finish()

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if server._authorized(self):
                    server._get(self)

            def do_POST(self) -> None:
                if server._authorized(self):
                    server._post(self)

        self.handler = Handler
        self._listen(0)

    def _listen(self, port: int) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            if self.tls.client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(self.tls.client_ca))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def go_away(self) -> None:
        """The API server is gone (a control-plane outage): open watches end,
        every open connection is closed, new ones are refused. The objects stay
        and can still be changed (they are what it serves when it is back)."""
        import socket

        self.port = self.httpd.server_address[1]
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def come_back(self) -> None:
        """Listen again on the same address (the objects as they are now; the
        history kept, so watches resume from their resourceVersion)."""
        self._listen(self.port)

    # -- set-up ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def kubeconfig(self, path: Path, cluster: dict[str, Any] | None = None,
                   user: dict[str, Any] | None = None) -> Path:
        """A kubeconfig for this server; `cluster` and `user` add or replace
        fields (the user's default is the token)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url, **(cluster or {})}}],
            "users": [{"name": "test", "user": user if user is not None
                       else {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return path

    def close(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- mutations (what kubectl would do) ---------------------------------------------

    def _resource_of(self, obj: dict[str, Any]) -> str:
        return {"Service": "services", "EndpointSlice": "endpointslices",
                "Node": "nodes", "IPAddressPool": "ipaddresspools"}[obj["kind"]]

    def apply(self, obj: dict[str, Any]) -> int:
        obj = copy.deepcopy(obj)
        resource = self._resource_of(obj)
        with self.cond:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            k = key_of(obj)
            etype = "MODIFIED" if k in self.objects[resource] else "ADDED"
            self.objects[resource][k] = obj
            self.history.append((self.rv, resource, etype, obj))
            self.cond.notify_all()
            return self.rv

    def delete(self, obj: dict[str, Any]) -> int:
        resource = self._resource_of(obj)
        with self.cond:
            old = self.objects[resource].pop(key_of(obj))
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, resource, "DELETED", gone))
            self.cond.notify_all()
            return self.rv

    def compact(self) -> None:
        """Compact history: new watches from any resourceVersion seen so far get
        410. (Watches already open keep streaming, as etcd's do.)"""
        with self.cond:
            self.rv += 1
            self.min_rv = self.rv

    def drop_watches(self) -> None:
        """End every open watch stream (a connection drop or an API server
        replaced behind a load balancer)."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def restart(self, jump: int = 100000) -> None:
        """Like an API server (and etcd) restored elsewhere: open watches end,
        the resourceVersion jumps, old resourceVersions are gone."""
        with self.cond:
            self.generation += 1
            self.rv += jump
            self.min_rv = self.rv
            self.cond.notify_all()

    def fail(self, path: str, status: int, count: int = 1, watch_only: bool = False,
             **headers: str) -> None:
        with self.cond:
            self.faults.append(Fault(path, status, count, dict(headers), watch_only))

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self.cond:
            return copy.deepcopy(self.objects)

    # -- HTTP ------------------------------------------------------------------------

    def _send_json(self, h: BaseHTTPRequestHandler, status: int, body: Any,
                   headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str,
                headers: dict[str, str] | None = None) -> None:
        self._send_json(h, code, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Failure", "message": message, "reason": reason,
                                  "code": code}, headers)

    def _fault_for(self, path: str, watch: bool) -> Fault | None:
        with self.cond:
            for f in self.faults:
                if path.startswith(f.path) and f.count > 0 and (watch or not f.watch_only):
                    f.count -= 1
                    return f
        return None

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.token is None or h.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self.requests.append("UNAUTHORIZED " + urlparse(h.path).path)
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        self._status(h, 401, "Unauthorized", "Unauthorized")
        return False

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        watch = q.get("watch") in ("true", "1", "True")
        self.requests.append(("WATCH " if watch else "LIST ") + url.path)
        if self.delay:
            time.sleep(self.delay)
        fault = self._fault_for(url.path, watch)
        if fault is not None:
            reason = {410: "Expired", 429: "TooManyRequests", 500: "InternalError"}.get(
                fault.status, "Failure")
            self._status(h, fault.status, reason, f"injected {fault.status}", fault.headers)
            return
        if url.path not in RESOURCES:
            self._status(h, 404, "NotFound", f"the server could not find {url.path}")
            return
        resource, kind, api_version = RESOURCES[url.path]
        if watch:
            self._watch(h, resource, kind, api_version, q)
        else:
            self._list(h, resource, kind, api_version, q)

    def _selected(self, obj: dict[str, Any], q: dict[str, str]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        if not selector_matches(q.get("labelSelector", ""), labels):
            return False
        fs = q.get("fieldSelector", "")
        if fs.startswith("metadata.name="):
            return bool(obj["metadata"]["name"] == fs.split("=", 1)[1])
        return True

    def _list(self, h: BaseHTTPRequestHandler, resource: str, kind: str, api_version: str,
              q: dict[str, str]) -> None:
        with self.cond:
            if q.get("continue"):
                token = json.loads(base64.b64decode(q["continue"]))
                if token["rv"] < self.min_rv:
                    self._status(h, 410, "Expired", "The provided continue parameter is too "
                                 "old to display a consistent list result.")
                    return
                list_rv, start = token["rv"], token["start"]
                items = [o for _, o in sorted(token_state(self, resource, list_rv).items())]
            else:
                list_rv, start = self.rv, 0
                _snapshots[(id(self), resource, list_rv)] = copy.deepcopy(self.objects[resource])
                items = [o for _, o in sorted(self.objects[resource].items())]
        items = [o for o in items if self._selected(o, q)]
        limit = int(q.get("limit") or 0)
        page = items[start:start + limit] if limit else items[start:]
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(json.dumps(
                {"rv": list_rv, "start": start + limit}).encode()).decode()
        out = []
        for o in page:
            item = copy.deepcopy(o)
            item.pop("kind", None)
            item.pop("apiVersion", None)
            out.append(item)
        self._send_json(h, 200, {"kind": f"{kind}List", "apiVersion": api_version,
                                 "metadata": meta, "items": out})

    def _watch(self, h: BaseHTTPRequestHandler, resource: str, kind: str, api_version: str,
               q: dict[str, str]) -> None:
        since = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 30)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1", "True")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        def end() -> None:
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()

        deadline = time.monotonic() + timeout
        last_bookmark = time.monotonic()
        try:
            with self.cond:
                generation = self.generation
                if since and since < self.min_rv:
                    expired = {"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": f"too old resource version: {since} ({self.min_rv})"}}
                    chunk(json.dumps(expired).encode() + b"\n")
                    end()
                    return
            sent = since
            while True:
                with self.cond:
                    pending = [e for e in self.history if e[0] > sent and e[1] == resource]
                    # taken with `pending`, not after the wait: an event that
                    # arrives while waiting is newer than `current`, so a
                    # bookmark at `current` cannot skip it (it did: a deleted
                    # Service's DELETED was lost now and then)
                    current = self.rv
                    if not pending:
                        self.cond.wait(0.1)
                    if self.generation != generation:
                        h.close_connection = True
                        return  # server "restarted": the stream just ends
                for rv, _, etype, obj in pending:
                    sent = rv
                    if not self._selected(obj, q):
                        continue
                    line = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
                    with self.cond:
                        drop = self.drop_watch_mid_event > 0
                        if drop:
                            self.drop_watch_mid_event -= 1
                    if drop:
                        chunk(line[:len(line) // 2])
                        h.close_connection = True
                        return  # connection dies mid-event, no terminating chunk
                    chunk(line)
                now = time.monotonic()
                if bookmarks and now - last_bookmark >= self.bookmark_interval:
                    last_bookmark = now
                    sent = max(sent, current)
                    chunk(json.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(sent)}}}).encode() + b"\n")
                if now >= deadline:
                    end()
                    return
        except (BrokenPipeError, ConnectionResetError):
            return

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        self.requests.append("POST " + url.path)
        if url.path.endswith("/events"):
            with self.cond:
                self.rv += 1
                body.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
                self.posted_events.append(body)
            self._send_json(h, 201, body)
            return
        self._status(h, 404, "NotFound", f"the server could not find {url.path}")


# list snapshots for consistent paging (continue tokens refer to them)
_snapshots: dict[tuple[int, str, int], dict[str, dict[str, Any]]] = {}


def token_state(server: FakeAPIServer, resource: str, rv: int) -> dict[str, dict[str, Any]]:
    return _snapshots.get((id(server), resource, rv), server.objects[resource])
