"""Client for host tests, run inside a client namespace. Prints one JSON object.

  http HOST PORT COUNT      COUNT new TCP connections, one GET each: who answered
  whoami HOST PORT COUNT    the same, answered with the client address the pod saw
  udp HOST PORT COUNT       COUNT datagrams from fresh sockets
  udp-same HOST PORT COUNT  COUNT datagrams from one socket (one conntrack entry)
  udp-hold HOST PORT        one UDP socket; per line on stdin send a datagram and
                            print who answered (a line each)
  sctp HOST PORT COUNT      COUNT new SCTP associations: who answered
  hold HOST PORT            open one HTTP connection, answer once, then wait for a
                            line on stdin and ask again on the same connection
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import sys
import time
from collections import Counter

TIMEOUT = 1.0


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def http_once(host: str, port: int, path: str = "/") -> str:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("GET", path, headers={"Connection": "close"})
        body = conn.getresponse().read().decode()
        conn.close()
        return body
    except ConnectionRefusedError:
        return "!refused"
    except TimeoutError:
        return "!timeout"
    except OSError as exc:
        if exc.errno == errno.EHOSTUNREACH:
            return "!unreachable"
        return f"!{type(exc).__name__}"


def udp_once(sock: socket.socket, host: str, port: int) -> str:
    sock.sendto(b"hi", (host, port))
    try:
        data, _ = sock.recvfrom(2048)
        return data.decode()
    except TimeoutError:
        return "!timeout"
    except ConnectionRefusedError:
        return "!refused"


def sctp_once(host: str, port: int) -> str:
    try:
        with socket.socket(family(host), socket.SOCK_STREAM, socket.IPPROTO_SCTP) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect((host, port))
            return sock.recv(256).decode()
    except ConnectionRefusedError:
        return "!refused"
    except TimeoutError:
        return "!timeout"
    except OSError as exc:
        return f"!{type(exc).__name__}"


def run(argv: list[str]) -> dict[str, object]:
    """The one-shot modes (http, whoami, sctp, udp, udp-same): their JSON answer.
    Topology.client() runs this in-process on a thread inside the client's
    namespace (a Python start per call costs seconds in the emulated VM)."""
    mode, host, port = argv[0], argv[1], int(argv[2])
    out: dict[str, object] = {}
    if mode == "whoami":
        out["answers"] = Counter(http_once(host, port, "/whoami") for _ in range(int(argv[3])))
    elif mode == "http":
        started = time.monotonic()
        out["answers"] = Counter(http_once(host, port) for _ in range(int(argv[3])))
        out["seconds"] = time.monotonic() - started
    elif mode == "sctp":
        out["answers"] = Counter(sctp_once(host, port) for _ in range(int(argv[3])))
    elif mode in ("udp", "udp-same"):
        answers: Counter[str] = Counter()
        sock = None
        for _ in range(int(argv[3])):
            if sock is None or mode == "udp":
                if sock is not None:
                    sock.close()
                sock = socket.socket(family(host), socket.SOCK_DGRAM)
                sock.settimeout(TIMEOUT)
            answers[udp_once(sock, host, port)] += 1
        if sock is not None:
            sock.close()
        out["answers"] = answers
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "udp-hold":
        sock = socket.socket(family(host), socket.SOCK_DGRAM)
        sock.settimeout(TIMEOUT)
        for _ in sys.stdin:
            print(udp_once(sock, host, port), flush=True)
        return
    if mode == "hold":
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/")
        first = conn.getresponse().read().decode()
        print(json.dumps({"first": first}), flush=True)
        sys.stdin.readline()
        try:
            conn.request("GET", "/")
            second = conn.getresponse().read().decode()
        except OSError as exc:
            second = f"!{type(exc).__name__}"
        print(json.dumps({"first": first, "second": second}), flush=True)
        return
    print(json.dumps(run(sys.argv[1:])), flush=True)


if __name__ == "__main__":
    main()
