"""A "pod" for host tests: answers HTTP (TCP 8080), UDP (5353) and, where the
kernel has SCTP, SCTP (9090) with its name.

Run inside a backend network namespace; prints "ready" once the sockets listen.
HTTP keeps connections open (HTTP/1.1 keep-alive) so tests can hold one.
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]
FAMILY = socket.AF_INET6 if "--ipv6" in sys.argv else socket.AF_INET
ANY = "::" if FAMILY == socket.AF_INET6 else "0.0.0.0"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # "/whoami": the client address as this pod sees it (masquerade checks)
        body = (self.client_address[0] if self.path == "/whoami" else NAME).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    address_family = FAMILY
    daemon_threads = True


def udp_echo(sock: socket.socket) -> None:
    while True:
        _, addr = sock.recvfrom(2048)
        sock.sendto(NAME.encode(), addr)


def sctp_answer(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(NAME.encode())


def main() -> None:
    http = Server((ANY, 8080), Handler)
    udp = socket.socket(FAMILY, socket.SOCK_DGRAM)
    udp.bind((ANY, 5353))
    threading.Thread(target=udp_echo, args=(udp,), daemon=True).start()
    try:
        sctp = socket.socket(FAMILY, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError:
        pass  # no SCTP in this kernel (the host's): only the VM tests use it
    else:
        sctp.bind((ANY, 9090))
        sctp.listen(16)
        threading.Thread(target=sctp_answer, args=(sctp,), daemon=True).start()
    print("ready", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
