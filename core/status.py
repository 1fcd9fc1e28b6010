"""`svcproxy run --status-file PATH`: a small JSON file an operator (or a probe,
or `svcproxy status`) can read to see which datapath runs, why others were
skipped, and how the last sync went. Written atomically after every sync."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .datapath import SyncResult
from .hookspecs import hookimpl


class StatusFile:
    """An observer plugin that keeps the status file up to date."""

    def __init__(self, path: str | Path, node: str = "") -> None:
        self.path = Path(path)
        self.state: dict[str, Any] = {"node": node, "datapath": None, "fallbacks": [],
                                      "last_sync": None, "last_successful_sync": None}

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.state["datapath"] = datapath
        self.state["fallbacks"] = [{"datapath": d, "reason": r} for d, r in skipped]
        self.state["started"] = time.time()
        self.write()

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str, previous: str, reason: str) -> None:
        self.state["datapath"] = datapath
        self.state.setdefault("switches", []).append(
            {"time": time.time(), "from": previous, "to": datapath, "reason": reason})
        self.write()

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        record = {"time": result.started, "ok": result.ok, "full": result.full,
                  "duration_seconds": round(result.duration, 6), "error": result.error,
                  "frontends": result.frontends, "backends": result.backends,
                  "created": result.created, "updated": result.updated,
                  "deleted": result.deleted}
        self.state["last_sync"] = record
        if result.ok:
            self.state["last_successful_sync"] = record
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".status-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, self.path)


#: where `svcproxy run` answers `svcproxy status` (root only: the plan names
#: every service and endpoint of the cluster, so it is not on a TCP port)
DEFAULT_SOCKET = "/run/svcproxy/status.sock"


class StatusSocket:
    """An observer plugin serving, on a unix socket (mode 0600), the plan the
    kernel holds (GET /svcproxy/frontends) and the run's status (GET
    /svcproxy/status): what `svcproxy status` labels kernel objects with."""

    def __init__(self, path: str | Path, node: str = "") -> None:
        self.path = Path(path)
        #: the plan of the last successful sync, serialized only when asked
        self.plan: Any = None
        self.status: dict[str, Any] = {"node": node, "datapath": None, "fallbacks": [],
                                       "last_successful_sync": None}
        self.server: Any = None
        self.error = ""

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.status["datapath"] = datapath
        self.status["fallbacks"] = [{"datapath": d, "reason": r} for d, r in skipped]
        self.start()

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str) -> None:
        self.status["datapath"] = datapath

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        if result.ok and result.plan is not None:
            self.plan = result.plan
            self.status["last_successful_sync"] = result.started

    @hookimpl
    def svcproxy_stop_proxy(self) -> None:
        self.stop()

    def start(self) -> None:
        import socket
        import socketserver
        import threading
        from http.server import BaseHTTPRequestHandler

        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

            def do_GET(self) -> None:
                body: Any
                if self.path == "/svcproxy/frontends":
                    body = owner.plan.to_json() if owner.plan is not None else []
                elif self.path == "/svcproxy/status":
                    body = owner.status
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()  # left by a svcproxy that is gone
                else:
                    raise OSError(f"another svcproxy answers on {self.path}")
                finally:
                    probe.close()
            old = os.umask(0o177)
            try:
                self.server = Server(str(self.path), Handler)
            finally:
                os.umask(old)
        except OSError as exc:
            self.error = str(exc)
            import logging
            logging.getLogger(__name__).error(
                "cannot serve `svcproxy status` on %s: %s (status shows no service names)",
                self.path, exc)
            return
        threading.Thread(target=self.server.serve_forever, name="status-socket",
                         daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            with contextlib.suppress(OSError):
                self.path.unlink()


def ask_socket(path: str | Path, request: str, timeout: float = 2.0) -> Any:
    """GET `request` from a StatusSocket; the JSON body. Raises OSError/ValueError."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"GET {request} HTTP/1.0\r\nHost: svcproxy\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0]
    if line.split()[1:2] != [b"200"]:
        raise ValueError(f"{path}: {line.decode(errors='replace')}")
    return json.loads(body)
