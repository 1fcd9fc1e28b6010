"""Network-namespace test topologies: a "node" namespace that routes between
client namespaces and backend ("pod") namespaces, as a Kubernetes node routes
between the outside and its pods.

    client c1 (192.168.100.2)  --veth--  node  --veth--  pod 10.244.1.11 (node-a)
    client c2 (198.51.100.2)   --veth--  node  --veth--  pod 10.244.2.12 (node-b)

Pods get /32 addresses and a link-local gateway (169.254.1.1 / fe80::1), the
node a /32 route per pod: no bridge, so nothing but svcproxy's rules sits in the
path. Everything is removed by `close()`, including after a failed test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HERE = Path(__file__).parent
_ids = itertools.count()


def ipvs_available() -> bool:
    """Whether this machine's kernel has IPVS (loaded, or a module modprobe can
    load), found without changing anything: tests that take the datapath this
    kernel supports assert the IPVS path where it exists and the fallback
    where it does not."""
    if os.path.exists("/proc/net/ip_vs"):
        return True
    try:
        proc = subprocess.run(["modprobe", "-n", "-q", "ip_vs"], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ipset_save(netns: str) -> dict[str, set[str]]:
    """Every set in `netns` with its members, as `ipset save` (not svcproxy's
    reader) shows them: the independent view tests compare with."""
    out: dict[str, set[str]] = {}
    for line in sh("ipset", "save", netns=netns).stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["create"]:
            out.setdefault(parts[1], set())
        elif parts[:1] == ["add"]:
            out.setdefault(parts[1], set()).add(parts[2])
    return out


def sh(*args: str, netns: str | None = None, check: bool = True,
       stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def ip_batch(netns: str, commands: list[str]) -> None:
    """Several `ip` commands in one run inside `netns` (`ip -n NS -batch -`)."""
    sh("ip", "-n", netns, "-batch", "-", stdin="\n".join(commands) + "\n")


def write_sysctl(netns: str, key: str, value: str) -> None:
    """/proc/sys/net/KEY inside `netns`, from a thread there (no process)."""
    def write() -> None:
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(value)

    in_namespace(netns, write)


def syn_retransmits(netns: str) -> int:
    """TcpExt TCPSynRetrans of `netns`: SYNs its clients sent again because the
    first went unanswered (a dropped SYN) — the direct count of what a 1 s
    latency outlier only suggests."""
    def read() -> int:
        lines = Path("/proc/thread-self/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split(), values.split(), strict=True))
                           ["TCPSynRetrans"])
        raise AssertionError("no TcpExt line in /proc/net/netstat")

    return in_namespace(netns, read)


def in_namespace(netns: str, fn: Callable[[], T], timeout: float = 120) -> T:
    """Run `fn` on a thread inside `netns` (sockets it opens stay there)."""
    from svcproxy.plugins.kernel.netns import in_netns

    out: list[Any] = []

    def body() -> None:
        try:
            with in_netns(netns):
                out.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        raise TimeoutError(f"work in {netns} took over {timeout}s")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]  # type: ignore[no-any-return]


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    ip6: str | None = None
    process: Any = None  # its in-process server (backend_server.PodServer)


class UdpSession:
    """One UDP socket made inside a client namespace (a socket stays in the
    namespace it was made in, whichever thread uses it): each ask() sends a
    datagram from the same source port and returns who answered."""

    def __init__(self, sock: Any, host: str, port: int) -> None:
        self.sock, self.host, self.port = sock, host, port

    def ask(self) -> str:
        import traffic_client

        return str(traffic_client.udp_once(self.sock, self.host, self.port))

    def close(self) -> None:
        self.sock.close()


class TcpHold:
    """One HTTP connection made inside a client namespace and answered once
    (`first`); again() uses the same connection once more and closes it. It
    never reconnects: a new socket would be outside the namespace."""

    def __init__(self, conn: Any, first: str) -> None:
        self.conn = conn
        self.first = first

    def again(self) -> dict[str, str]:
        try:
            self.conn.request("GET", "/")
            second = self.conn.getresponse().read().decode()
        except OSError as exc:
            second = f"!{type(exc).__name__}"
        except Exception as exc:  # http.client.NotConnected and friends
            second = f"!{type(exc).__name__}"
        self.close()
        return {"first": self.first, "second": second}

    def close(self) -> None:
        self.conn.close()


class HeldFlows:
    """TCP connections and UDP flows held open through service addresses
    (Topology.hold_flows): `first` is the backend each answered from."""

    def __init__(self, tcp: dict[str, TcpHold], udp: dict[str, UdpSession]) -> None:
        self.tcp = tcp
        self.udp = udp
        self.first: dict[str, str] = {name: hold.first for name, hold in tcp.items()}
        for name, session in udp.items():
            self.first[name] = session.ask()

    def udp_answers(self) -> dict[str, str]:
        """Each UDP flow asked again (same source port): who answers."""
        return {name: s.ask() for name, s in self.udp.items()}

    def check(self) -> None:
        """Every flow still answers, from the backend it started with (the TCP
        connections are used once more and then closed)."""
        assert self.udp_answers() == {n: self.first[n] for n in self.udp}
        for name, hold in self.tcp.items():
            answer = hold.again()
            assert answer == {"first": self.first[name], "second": self.first[name]}, name


class Loader:
    """One load client (traffic_client.py `load` / `udp-load`) in a client
    namespace, in-process: its threads run inside the namespace. finish()
    stops it and returns the summary (ok, failed and why, p50/p99/max)."""

    def __init__(self, topo: Topology, args: list[str], client: str = "c1") -> None:
        import traffic_client

        self.load = traffic_client.Load()
        self.threads = in_namespace(topo.clients[client],
                                    lambda: traffic_client.start_load(self.load, args))

    def finish(self) -> dict[str, Any]:
        self.load.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        summary: dict[str, Any] = self.load.summary()
        return summary


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"svp{os.getpid() % 100000}x{next(_ids)}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    pods: dict[str, Pod] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)
    servers: list[Any] = field(default_factory=list)
    #: held connections and UDP sockets, closed with the topology
    holds: list[Any] = field(default_factory=list)
    _links = itertools.count()

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    # Each namespace is configured with one `ip -n NS -batch -` per side: every
    # `ip` run costs a fraction of a second under the VM's emulation, and a pod
    # took eighteen of them.

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        return ns

    def _veth(self, peer_ns: str) -> tuple[str, str, str]:
        """Names for a veth pair between the node and `peer_ns`, and the line of
        the node's batch that makes it (so the pair costs no `ip` run of its own)."""
        n = next(self._links)
        node_if, peer_if = f"v{n}n", f"v{n}p"
        return node_if, peer_if, f"link add {node_if} type veth peer name {peer_if} netns {peer_ns}"

    def create_node(self) -> str:
        self._ns("node")
        ip_batch(self.node, ["link set lo up"])
        for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            write_sysctl(self.node, key, "1")
        return self.node

    def add_client(self, name: str, ip: str, node_ip: str, prefix: int = 24,
                   ip6: str | None = None, node_ip6: str | None = None) -> str:
        ns = self._ns(name)
        node_if, peer_if, make = self._veth(ns)
        node = [make, f"link set {node_if} up", f"addr add {node_ip}/{prefix} dev {node_if}"]
        peer = ["link set lo up", f"link set {peer_if} up",
                f"addr add {ip}/{prefix} dev {peer_if}", f"route add default via {node_ip}"]
        if ip6 and node_ip6:
            node.append(f"addr add {node_ip6}/64 dev {node_if} nodad")
            peer += [f"addr add {ip6}/64 dev {peer_if} nodad",
                     f"route add default via {node_ip6}"]
        ip_batch(self.node, node)
        ip_batch(ns, peer)
        self.clients[name] = ns
        return ns

    def set_default_route(self, via: str) -> None:
        ip_batch(self.node, [f"route add default via {via}"])

    def add_pod(self, name: str, ip: str, ip6: str | None = None) -> Pod:
        ns = self._ns(name)
        node_if, peer_if, make = self._veth(ns)
        node = [make, f"link set {node_if} up", f"addr add 169.254.1.1/32 dev {node_if}",
                f"route add {ip}/32 dev {node_if}"]
        peer = ["link set lo up", f"link set {peer_if} up", f"addr add {ip}/32 dev {peer_if}",
                f"route add 169.254.1.1 dev {peer_if}",
                f"route add default via 169.254.1.1 dev {peer_if}"]
        if ip6:
            node += [f"addr add fe80::1/64 dev {node_if} nodad",
                     f"route add {ip6}/128 dev {node_if}"]
            peer += [f"addr add {ip6}/128 dev {peer_if} nodad",
                     f"route add default via fe80::1 dev {peer_if}"]
        ip_batch(self.node, node)
        ip_batch(ns, peer)
        pod = Pod(name, ip, ns, ip6)
        pod.process = self._serve(name, ns, ipv6=bool(ip6))
        self.pods[name] = pod
        return pod

    def _serve(self, name: str, ns: str, ipv6: bool) -> Any:
        import backend_server

        sockets = in_namespace(ns, lambda: backend_server.open_sockets(ipv6))
        server = backend_server.PodServer(name, sockets)
        server.start()
        self.servers.append(server)
        return server

    def client(self, client: str, *args: str, timeout: float = 120) -> dict[str, object]:
        """traffic_client's one-shot modes, run in-process on a thread inside the
        client's namespace (its sockets live there)."""
        import traffic_client

        result = in_namespace(self.clients[client], lambda: traffic_client.run(list(args)),
                              timeout)
        # through JSON, as before: Counter keys and values as a plain dict
        return json.loads(json.dumps(result))  # type: ignore[no-any-return]

    def answers(self, client: str, mode: str, host: str, port: int,
                count: int) -> dict[str, int]:
        return self.client(client, mode, host, str(port), str(count))["answers"]  # type: ignore[return-value]

    def hold(self, client: str, host: str, port: int) -> TcpHold:
        """Open one HTTP connection from `client` (in-process: a Python start
        per connection costs seconds under emulation) and use it once."""
        import http.client

        def connect() -> TcpHold:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.auto_open = 0  # type: ignore[attr-defined]
            conn.connect()
            conn.request("GET", "/")
            return TcpHold(conn, conn.getresponse().read().decode())

        hold = in_namespace(self.clients[client], connect)
        self.holds.append(hold)
        return hold

    def hold_udp(self, client: str, host: str, port: int) -> UdpSession:
        """One UDP socket in `client`; each ask() sends from the same source port."""
        import socket

        def make() -> UdpSession:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.settimeout(1.0)
            return UdpSession(sock, host, port)

        session = in_namespace(self.clients[client], make)
        self.holds.append(session)
        return session

    def hold_flows(self, client: str, tcp: dict[str, tuple[str, int]],
                   udp: dict[str, tuple[str, int]] | None = None) -> HeldFlows:
        """Open one TCP connection per `tcp` entry and one UDP flow per `udp`
        entry (name -> (host, port)) from `client`, each answered once."""
        return HeldFlows({n: self.hold(client, h, p) for n, (h, p) in tcp.items()},
                         {n: self.hold_udp(client, h, p) for n, (h, p) in (udp or {}).items()})

    def close(self) -> None:
        for hold in self.holds:
            with contextlib.suppress(Exception):
                hold.close()
        self.holds.clear()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.close()
        self.servers.clear()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        if self.namespaces and os.path.exists("/sys/module/ip_vs"):
            # the kernel removes a deleted namespace's virtual servers later,
            # from a table every namespace shares, and a dump in another
            # namespace meanwhile skips entries (IPVSNetlink.services): gone now
            for ns in self.namespaces:
                sh("ip", "netns", "exec", ns, "ipvsadm", "-C", check=False)
        # one `ip` run for all (-force: past one already gone)
        if self.namespaces:
            sh("ip", "-force", "-batch", "-", check=False,
               stdin="".join(f"netns del {ns}\n" for ns in reversed(self.namespaces)))
        self.namespaces.clear()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SvcProxyRun:
    """The real `svcproxy run` process, as the DaemonSet runs it: its log kept
    in a file, its first sync awaited on its status socket, its /metrics
    scraped on loopback. Registered with the topology, so it is killed with it."""

    def __init__(self, topo: Topology, workdir: Path, args: list[str], config: str,
                 env: dict[str, str] | None = None) -> None:
        self.topo = topo
        self.workdir = workdir
        self.metrics_address = f"127.0.0.1:{free_port()}"
        (workdir / "config.yaml").write_text(config.replace("METRICS", self.metrics_address))
        self.sock = workdir / "status.sock"
        self.log_path = workdir / "svcproxy.log"
        self.cmd = [str(Path(sys.executable).parent / "svcproxy"), "run", "--config",
                    str(workdir / "config.yaml"), "--status-socket", str(self.sock), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60) -> None:
        import time

        from svcproxy.status import ask_socket

        log = open(self.log_path, "a")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log,
                                     text=True, env=self.env)
        log.close()
        self.topo.processes.append(self.proc)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ask_socket(self.sock, "/svcproxy/status")["last_successful_sync"]:
                    return
            except (OSError, ValueError):
                pass
            assert self.proc.poll() is None, f"svcproxy exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no first sync:\n{self.log()}"
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        import signal

        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


# ---- the DaemonSet's privileges -------------------------------------------------------

def daemonset_containers() -> dict[str, dict]:  # type: ignore[type-arg]
    """deploy/daemonset.yaml's containers (init containers too) by name."""
    import yaml

    docs = yaml.safe_load_all((HERE.parents[1] / "deploy" / "daemonset.yaml").read_text())
    ds = next(d for d in docs if d and d.get("kind") == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def shipped_capabilities() -> list[str]:
    """The main container's capabilities, as `setpriv --bounding-set` spells them."""
    main = daemonset_containers()["svcproxy"]
    sc = main["securityContext"]
    assert not sc.get("privileged"), "the main container is privileged"
    assert sc["capabilities"]["drop"] == ["ALL"]
    return [c.lower() for c in sc["capabilities"]["add"]]


def has_capability(name: str) -> bool:
    """Whether this machine lets root have `name` at all (its bounding set)."""
    bits = {"net_admin": 12, "net_raw": 13, "sys_resource": 24}
    status = Path("/proc/self/status").read_text()
    bounding = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("CapBnd:")), 16)
    return bool(bounding >> bits[name] & 1)


def unprivileged(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`svcproxy ARGS` inside `netns` with the shipped capabilities only and
    /proc/sys read-only (in the private mount namespace `ip netns exec` makes)."""
    caps = ",".join(f"+{c}" for c in shipped_capabilities() if has_capability(c))
    script = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
              f"exec setpriv --bounding-set=-all,{caps} --inh-caps=-all -- \"$@\"")
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    return subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", script, "sh", svcproxy,
                           *args], capture_output=True, text=True, timeout=300)
