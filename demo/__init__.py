"""`svcproxy demo`: the newcomer's one command.

Builds a throwaway "node" out of network namespaces — the node, a client on
the node's LAN, and one namespace per pod of the example cluster with a small
server that answers with its pod's name — runs svcproxy on it with the best
datapath this kernel supports (IPVS when it can, else the fallback, saying
which and why), sends requests to ClusterIPs, NodePorts and LoadBalancer IPs,
prints who answered how often, shows a rolling update that keeps an open
connection working, and removes everything again.

Everything svcproxy programs lives inside the demo's namespaces (datapath
option `netns`), so deleting them removes every rule, set, virtual server and
address; the host is not touched.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from svcproxy.bus import Event, EventType
from svcproxy.config import parse_config
from svcproxy.errors import SvcProxyError, UsageError
from svcproxy.ir import FrontendKind, ServiceMap
from svcproxy.manager import PluginHost
from svcproxy.model import EndpointSlice, Service
from svcproxy.plugins.kernel.netns import in_netns
from svcproxy.proxy import Proxy
from svcproxy.sources.manifests import ManifestSource

T = TypeVar("T")
NODE_IP = "192.168.50.11"
CLIENT_IP = "192.168.50.100"
GATEWAY = "169.254.1.1"
REPO = Path(__file__).resolve().parents[1]


def sh(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def in_thread(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that lives in `netns` (its sockets stay there)."""
    out: list[Any] = []

    def body() -> None:
        try:
            with in_netns(netns):
                out.append(("ok", fn()))
        except BaseException as exc:  # handed to the caller
            out.append(("err", exc))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    kind, value = out[0]
    if kind == "err":
        raise value
    return value  # type: ignore[no-any-return]


# ---- the pods' servers -------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pod = ""

    def do_GET(self) -> None:
        body = self.server.pod.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Pod:
    name: str
    ip: str
    ns: str
    ports: set[tuple[int, str]] = field(default_factory=set)
    servers: list[Any] = field(default_factory=list)

    def serve(self) -> None:
        for port, proto in sorted(self.ports):
            if proto == "TCP":
                sock = in_thread(self.ns, functools.partial(_listen, self.ip, port))
                server = ThreadingHTTPServer((self.ip, port), _Handler, bind_and_activate=False)
                server.socket.close()
                server.socket = sock
                server.daemon_threads = True
                server.pod = self.name  # type: ignore[attr-defined]
                threading.Thread(target=server.serve_forever, daemon=True).start()
                self.servers.append(server)
            elif proto == "UDP":
                usock = in_thread(self.ns, functools.partial(_udp, self.ip, port))
                threading.Thread(target=_echo, args=(usock, self.name), daemon=True).start()
                self.servers.append(usock)

    def stop(self) -> None:
        for s in self.servers:
            if isinstance(s, ThreadingHTTPServer):
                s.shutdown()
                s.server_close()
            else:
                s.close()


def _listen(ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    return s


def _udp(ip: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    return s


def _echo(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _, addr = sock.recvfrom(2048)
            sock.sendto(name.encode(), addr)
        except OSError:
            return


# ---- the client ----------------------------------------------------------------------

def http_get(host: str, port: int) -> str:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", "/", headers={"Connection": "close"})
        body = conn.getresponse().read().decode()
        conn.close()
        return body
    except (OSError, http.client.HTTPException) as exc:
        return f"!{type(exc).__name__}"


def udp_ask(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"hi", (host, port))
        try:
            return s.recv(2048).decode()
        except OSError as exc:
            return f"!{type(exc).__name__}"


# ---- the demo ------------------------------------------------------------------------

class Demo:
    def __init__(self, manifests: Path, config_path: Path | None, requests: int,
                 out: Callable[[str], None] = print) -> None:
        self.manifests = manifests
        self.config_path = config_path
        self.requests = requests
        self.out = out
        self.prefix = f"svpd{secrets.token_hex(2)}"
        self.node = f"{self.prefix}-node"
        self.client = f"{self.prefix}-client"
        self.namespaces: list[str] = []
        self.pods: dict[str, Pod] = {}
        self.tmp = tempfile.mkdtemp(prefix="svcproxy-demo-")
        self.host: PluginHost | None = None

    # -- topology --------------------------------------------------------------------

    def _netns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        self.namespaces.append(ns)  # before it exists: a failure still removes it
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", netns=ns)
        return ns

    def _veth(self, a_ns: str, b_ns: str) -> tuple[str, str]:
        n = len(self.namespaces)
        a, b = f"sd{n}a", f"sd{n}b"
        sh("ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", b, "netns", b_ns)
        sh("ip", "link", "set", a, "up", netns=a_ns)
        sh("ip", "link", "set", b, "up", netns=b_ns)
        return a, b

    def build(self, pods: dict[str, tuple[str, set[tuple[int, str]]]]) -> None:
        self._netns("node")
        self._netns("client")
        node_if, client_if = self._veth(self.node, self.client)
        sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", node_if, netns=self.node)
        sh("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", client_if, netns=self.client)
        sh("ip", "route", "add", "default", "via", NODE_IP, netns=self.client)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=self.node)
        for ip, (name, ports) in sorted(pods.items()):
            ns = self._netns(f"p{len(self.pods)}")
            node_if, pod_if = self._veth(self.node, ns)
            sh("ip", "addr", "add", f"{GATEWAY}/32", "dev", node_if, netns=self.node)
            sh("ip", "route", "add", f"{ip}/32", "dev", node_if, netns=self.node)
            sh("ip", "addr", "add", f"{ip}/32", "dev", pod_if, netns=ns)
            sh("ip", "route", "add", GATEWAY, "dev", pod_if, netns=ns)
            sh("ip", "route", "add", "default", "via", GATEWAY, "dev", pod_if, netns=ns)
            pod = Pod(name, ip, ns, ports)
            pod.serve()
            self.pods[ip] = pod

    def teardown(self) -> int:
        for pod in self.pods.values():
            with contextlib.suppress(Exception):
                pod.stop()
        if self.host is not None:
            with contextlib.suppress(Exception):
                self.host.stop()
        removed = 0
        for ns in reversed(self.namespaces):
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                              check=False).returncode == 0:
                removed += 1
        self.namespaces.clear()
        for f in Path(self.tmp).glob("*"):
            f.unlink()
        os.rmdir(self.tmp)
        return removed

    # -- svcproxy --------------------------------------------------------------------

    def config_text(self) -> str:
        kube = (self.config_path.read_text() if self.config_path else
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                "kind: KubeProxyConfiguration\nmode: ipvs\n")
        # the demo's own SvcProxyConfiguration: everything inside the node namespace
        kube_doc = "\n".join(
            doc for doc in kube.split("\n---\n") if "kind: SvcProxyConfiguration" not in doc)
        return kube_doc + textwrap.dedent(f"""
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [metrics, metallb]   # no servers on the machine's own ports
            datapaths: [ipvs, nftables, iptables]
            datapathOptions:
              ipvs: {{netns: {self.node}, sysctlBackup: {self.tmp}/sysctl.json}}
              nftables: {{netns: {self.node}}}
              iptables: {{netns: {self.node}}}
        """)

    def run(self) -> int:
        config = parse_config(self.config_text(), "svcproxy demo")
        holder = _Holder()
        source = ManifestSource(str(self.manifests), publish=holder.publish)
        source.check_directory()
        source.scan()
        pods = pods_of(holder.slices)
        self.out(f"svcproxy demo: a throwaway node in network namespaces ({self.prefix}-*)")
        self.build(pods)
        self.out(f"  node {self.node} ({NODE_IP}), client {self.client} ({CLIENT_IP}), "
                 f"{len(self.pods)} pods answering with their names")
        host = self.host = PluginHost(config)
        host.configure()
        datapath, skipped = host.select_datapath()
        for name, reason in skipped:
            self.out(f"  datapath {name}: unusable here ({reason})")
        self.out(f"  datapath: {datapath}" + (" (the primary one)" if not skipped else
                                              " (the fallback)"))
        proxy = Proxy(config, host, "node-a", datapath, use_host_addresses=False)
        for event in holder.events:
            proxy.bus.publish(event)
        host.start(datapath, skipped, "node-a")
        result = proxy.sync(full=True)
        if not result.ok:
            raise RuntimeError(f"sync failed: {result.error}")
        self.out(f"  synced: {result.frontends} frontends, {result.backends} backends in "
                 f"{result.duration:.2f}s\n")
        self.show_answers(proxy.applied, datapath)
        if datapath == "ipvs":
            self.show_schedulers(proxy, holder)
        self.rolling_update(proxy, holder)
        return 0

    def show_answers(self, plan: ServiceMap, datapath: str) -> None:
        n = self.requests
        self.out(f"Who answered ({n} new connections or datagrams per frontend, from the "
                 "client)")
        self.out(f"  {'service':<32} {'frontend':<22} {'kind':<12} {'sched':<6} answers")
        for fe in plan:
            if fe.family != 4 or fe.protocol not in ("TCP", "UDP") or not fe.backends:
                continue
            if fe.kind == FrontendKind.NODE_PORT and fe.address != NODE_IP:
                continue
            answers = self.ask(fe.address, fe.port, fe.protocol, n)
            sched = fe.scheduler if datapath == "ipvs" else "random"
            if fe.persistence_timeout:
                sched += "+aff"
            self.out(f"  {fe.service:<32} {fe.address + ':' + str(fe.port):<22} "
                     f"{fe.kind!s:<12} {sched:<6} {fmt(answers)}")
        self.out("")

    def ask(self, host: str, port: int, proto: str, n: int) -> Counter[str]:
        ask = udp_ask if proto == "UDP" else http_get
        return in_thread(self.client, lambda: Counter(ask(host, port) for _ in range(n)))

    def show_schedulers(self, proxy: Proxy, holder: _Holder) -> None:
        """IPVS: the same Service under other schedulers (annotation)."""
        web = holder.services.get("shop/web")
        if web is None:
            return
        self.out("IPVS schedulers for shop/web (annotation svcproxy.io/ipvs-scheduler)")
        for sched in ("rr", "sh", "lc"):
            changed = replace(web, annotations=(("svcproxy.io/ipvs-scheduler", sched),))
            proxy.bus.publish(Event(EventType.MODIFIED, changed))
            proxy.sync()
            self.out(f"  {sched:<4} {fmt(self.ask('10.96.10.10', 80, 'TCP', self.requests))}")
        proxy.bus.publish(Event(EventType.MODIFIED, web))
        proxy.sync()
        self.out("")

    def rolling_update(self, proxy: Proxy, holder: _Holder) -> None:
        web = next((sl for sl in holder.slices if sl.service_key == "shop/web"), None)
        if web is None:
            return
        self.out("Rolling update of shop/web: the pod serving an open connection goes away")

        def open_conn() -> tuple[http.client.HTTPConnection, str]:
            conn = http.client.HTTPConnection("10.96.10.10", 80, timeout=3)
            conn.request("GET", "/")
            return conn, conn.getresponse().read().decode()

        conn, first = in_thread(self.client, open_conn)
        gone = next(p for p in self.pods.values() if p.name == first)
        shrunk = replace(web, endpoints=tuple(e for e in web.endpoints
                                              if gone.ip not in e.addresses))
        proxy.bus.publish(Event(EventType.MODIFIED, shrunk))
        result = proxy.sync()
        details = result.apply.details if result.apply else {}
        draining = details.get("draining")
        self.out(f"  shop/web: endpoint {gone.ip} ({first}) removed"
                 + (f"; IPVS keeps it at weight 0 while it drains ({draining} draining)"
                    if draining else "; conntrack keeps the open connection's NAT"))

        def again() -> str:
            try:
                conn.request("GET", "/")
                return conn.getresponse().read().decode()
            except (OSError, http.client.HTTPException) as exc:
                return f"!{type(exc).__name__}"
            finally:
                conn.close()

        second = in_thread(self.client, again)
        ok = "no error" if second == first else "BROKEN"
        self.out(f"  the open connection: answered by {first} before, {second} after ({ok})")
        self.out(f"  {self.requests} new connections: "
                 f"{fmt(self.ask('10.96.10.10', 80, 'TCP', self.requests))}")
        if second != first:
            raise RuntimeError("the open connection did not survive the endpoint's removal")
        self.out("")


def fmt(answers: Counter[str]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(answers.items()))


class _Holder:
    """What the manifest source read: events to replay, Services and slices."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.slices: list[EndpointSlice] = []
        self.services: dict[str, Service] = {}

    def publish(self, event: Event) -> None:
        self.events.append(event)
        obj = event.object
        if isinstance(obj, EndpointSlice):
            self.slices.append(obj)
        elif isinstance(obj, Service):
            self.services[obj.key] = obj


def pods_of(slices: list[EndpointSlice]) -> dict[str, tuple[str, set[tuple[int, str]]]]:
    """One pod per IPv4 endpoint address, with the ports it serves, named after
    its Service."""
    pods: dict[str, tuple[str, set[tuple[int, str]]]] = {}
    counters: Counter[str] = Counter()
    for sl in sorted(slices, key=lambda s: s.key):
        if sl.address_type != "IPv4":
            continue
        for ep in sl.endpoints:
            for ip in ep.addresses:
                if ip not in pods:
                    counters[sl.service_name] += 1
                    pods[ip] = (f"{sl.service_name}-{counters[sl.service_name]}", set())
                for p in sl.ports:
                    if p.port and p.protocol in ("TCP", "UDP"):
                        pods[ip][1].add((p.port, p.protocol))
    return pods


@contextlib.contextmanager
def _signals_to_cleanup() -> Iterator[None]:
    import signal

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_demo(manifests: str | None, config: str | None, requests: int) -> int:
    if os.geteuid() != 0:
        raise UsageError("svcproxy demo builds network namespaces: run it as root")
    mdir = Path(manifests) if manifests else REPO / "examples" / "cluster"
    if not mdir.is_dir():
        raise UsageError(f"--manifests: {mdir} is not a directory (the example cluster "
                         "ships in the repository's examples/cluster)")
    cpath = Path(config) if config else (REPO / "examples" / "config.yaml")
    demo = Demo(mdir, cpath if cpath.is_file() else None, requests)
    try:
        with _signals_to_cleanup():
            return demo.run()
    except RuntimeError as exc:
        raise SvcProxyError(f"demo failed: {exc}") from None
    finally:
        removed = demo.teardown()
        print(f"cleaned up: {removed} network namespaces removed (with every rule, set, "
              "virtual server and address inside them)")
        sys.stdout.flush()
