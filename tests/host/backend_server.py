"""A "pod" for host and VM tests: answers HTTP (TCP 8080), UDP (5353) and, where
the kernel has SCTP, SCTP (9090) with its name. HTTP keeps connections open
(HTTP/1.1 keep-alive) so tests can hold one; "/whoami" answers with the
client address the pod sees (masquerade checks).

Topology.add_pod() runs it in-process: `open_sockets()` on a thread inside the
pod's namespace (the sockets stay there), then `PodServer.start()` serves
them on daemon threads — a Python process per pod cost seconds in the
emulated VM. As a script (NAME [--ipv6]) it serves in the current namespace.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        name = self.server.pod_name  # type: ignore[attr-defined]
        body = (self.client_address[0] if self.path == "/whoami" else name).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.server.terminating:  # type: ignore[attr-defined]
            # a terminating pod still serves, and closes keep-alive connections
            # politely: this answer, then the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def open_sockets(ipv6: bool) -> list[socket.socket]:
    """[http, udp, sctp?] bound in the calling thread's network namespace."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    any_ = "::" if ipv6 else "0.0.0.0"
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((any_, 8080))
    tcp.listen(64)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((any_, 5353))
    out = [tcp, udp]
    try:
        sctp = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError:
        pass  # no SCTP in this kernel (the host's): only the VM tests use it
    else:
        sctp.bind((any_, 9090))
        sctp.listen(16)
        out.append(sctp)
    return out


class PodServer:
    def __init__(self, name: str, sockets: list[socket.socket]) -> None:
        self.name = name
        self.sockets = sockets
        tcp = sockets[0]
        self.http = ThreadingHTTPServer(tcp.getsockname()[:2], Handler,
                                        bind_and_activate=False)
        self.http.socket.close()
        self.http.socket = tcp
        self.http.daemon_threads = True
        self.http.pod_name = name  # type: ignore[attr-defined]
        self.http.terminating = False  # type: ignore[attr-defined]

    def terminate(self) -> None:
        """SIGTERM as a pod gets it: keep serving for the grace period, and tell
        keep-alive clients to go elsewhere."""
        self.http.terminating = True  # type: ignore[attr-defined]

    def start(self) -> None:
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        threading.Thread(target=self._udp, daemon=True).start()
        if len(self.sockets) > 2:
            threading.Thread(target=self._sctp, daemon=True).start()

    def _udp(self) -> None:
        sock = self.sockets[1]
        while True:
            try:
                _, addr = sock.recvfrom(2048)
                if addr is None:  # shut down
                    return
                sock.sendto(self.name.encode(), addr)
            except OSError:
                return

    def _sctp(self) -> None:
        sock = self.sockets[2]
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.name.encode())

    def close(self) -> None:
        """Stop serving and close every socket (an open socket keeps its
        namespace, and the namespace's links, alive)."""
        self.http.shutdown()
        self.http.server_close()
        for s in self.sockets[1:]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def main() -> None:
    server = PodServer(sys.argv[1], open_sockets("--ipv6" in sys.argv))
    server.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
