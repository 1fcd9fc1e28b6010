"""Cold start (issue #16, item 3), as a new node sees it: how long after the
API lists complete the API server's Service (10.96.0.1) and the cluster DNS
(10.96.0.10, UDP) answer, and when the whole first sync is done.

`svcproxy run --kubeconfig` against tests/apiserver.py (the real list/watch
wire protocol) holding N Services x 5 endpoints plus default/kubernetes and
kube-system/kube-dns, whose endpoint is a real "pod" (a network namespace
answering HTTP and UDP). The datapath programs a node namespace; a client
namespace routed through it connects to 10.96.0.1:443 and asks 10.96.0.10:53
every 20 ms until each answers. "Lists done" is when svcproxy logs the end of
its Service and EndpointSlice lists (its log is watched every 10 ms); the
first sync's end comes from the status file.

Each datapath runs twice: with the cold start (coldStart's default,
minServices 1000) and without it (minServices above N), so the gain is
measured, not assumed. Root.

    sudo python benchmarks/cold_start.py [--services 10000]
        [--datapaths iptables:legacy,iptables:nft,nftables]
    benchmarks/run-in-vm.sh benchmarks/cold_start.py --datapaths ipvs   (IPVS)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from apiserver import FakeAPIServer  # noqa: E402
from churn_latency import SyncLog  # noqa: E402
from factories import endpoint, node, service, slice_  # noqa: E402
from manifest_scale import cluster as manifest_cluster  # noqa: E402
from netns import Topology, in_namespace  # noqa: E402

NODE_IP = "192.168.100.1"
API_POD = "10.244.0.2"


def objects(n: int) -> list[dict[str, Any]]:
    """N Services x 5 endpoints (manifest_scale's, without the ten that would
    take 10.96.0.1-10), the API server's and the cluster DNS's."""
    objs = [o for o in manifest_cluster(n + 10)
            if o["kind"] != "Node" and int(str(o["metadata"]["name"]).split("-")[1]  # type: ignore[index]
                                           ) >= 10]
    objs.append(service("kubernetes", cluster_ip="10.96.0.1", ports=[
        {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8080}]))
    objs.append(slice_("kubernetes", endpoints=[endpoint(API_POD, "node-b")],
                       ports=[{"name": "https", "port": 8080, "protocol": "TCP"}]))
    objs.append(service("kube-dns", "kube-system", cluster_ip="10.96.0.10", labels={
        "k8s-app": "kube-dns"}, ports=[{"name": "dns", "port": 53, "protocol": "UDP",
                                        "targetPort": 5353}]))
    objs.append(slice_("kube-dns", "kube-system", endpoints=[endpoint(API_POD, "node-b")],
                       ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]))
    return objs


class LogWatch(threading.Thread):
    """The wall time each interesting line first appears in svcproxy's log."""

    WANTED = {"services": "initial list of services", "slices": "initial list of endpointslices",
              "first": "cold start:"}

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: dict[str, float] = {}
        self.lines: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            try:
                text = self.path.read_text(errors="replace")
            except OSError:
                continue
            now = time.time()
            for key, needle in self.WANTED.items():
                if key not in self.seen and needle in text:
                    self.seen[key] = now
                    at = text.index(needle)
                    self.lines[key] = text[at:text.find("\n", at)]


PROBE_TIMEOUT = [0.05]


def probe(stop: threading.Event, seen: dict[str, float]) -> None:
    """In the client namespace: connect to the API server's VIP and ask the
    DNS VIP every 20 ms until each has answered once."""
    while not stop.is_set() and len(seen) < 2:
        if "api" not in seen:
            try:
                with socket.create_connection(("10.96.0.1", 443), timeout=PROBE_TIMEOUT[0]):
                    seen["api"] = time.time()
            except OSError:
                pass
        if "dns" not in seen:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(PROBE_TIMEOUT[0])
            try:
                s.sendto(b"ping", ("10.96.0.10", 53))
                s.recvfrom(512)
                seen["dns"] = time.time()
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)


def run_one(n: int, datapath: str, backend: str, cold: bool, objs: list[dict[str, Any]],
            timeout: float, show_log: bool = False) -> dict[str, Any]:
    topo = Topology()
    server = FakeAPIServer()
    work = Path(tempfile.mkdtemp(prefix="svp-cold-"))
    proc: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    try:
        topo.create_node()
        topo.add_client("c1", "192.168.100.2", NODE_IP)
        topo.add_pod("api", API_POD)
        server.apply(node("node-a", ips=[NODE_IP]))
        for obj in objs:
            server.apply(obj)
        min_services = 1000 if cold else n + 1000
        (work / "config.yaml").write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: {datapath}
            clusterCIDR: 10.244.0.0/16
            metricsBindAddress: ""
            healthzBindAddress: ""
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [conntrack]
            datapaths: [{datapath}]
            coldStart: {{minServices: {min_services}}}
            datapathOptions:
              iptables: {{netns: {topo.node}, backend: {backend}}}
              nftables: {{netns: {topo.node}}}
              ipvs: {{netns: {topo.node}, sysctlBackup: {work / 'sysctl.json'}}}
        """))
        seen: dict[str, float] = {}
        prober = threading.Thread(target=lambda: in_namespace(
            topo.clients["c1"], lambda: probe(stop, seen), timeout + 60), daemon=True)
        prober.start()
        log = LogWatch(work / "svcproxy.log")
        log.start()
        syncs = SyncLog(work / "status.json")
        syncs.start()
        svcproxy = str(Path(sys.executable).parent / "svcproxy")
        started = time.time()
        with open(work / "svcproxy.log", "wb") as out:
            proc = subprocess.Popen([svcproxy, "--log-level", "debug" if show_log else "info",
                                     "run", "--kubeconfig",
                                     str(server.kubeconfig(work / "kubeconfig")),
                                     "--config", str(work / "config.yaml"), "--node", "node-a",
                                     "--status-socket", "", "--status-file",
                                     str(work / "status.json")],
                                    stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + timeout
        while not syncs.syncs or len(seen) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"no first sync with {datapath}:\n"
                                 + (work / "svcproxy.log").read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        time.sleep(0.1)
        lists = max(log.seen.get("services", 0.0), log.seen.get("slices", 0.0))
        first_end = min(syncs.syncs.values())
        if show_log:
            text = (work / "svcproxy.log").read_text(errors="replace")
            print(text[:text.find("full sync")], flush=True)
        return {"datapath": datapath + (f" ({backend})" if datapath == "iptables" else ""),
                "cold": cold, "lists": lists - started, "api": seen["api"] - lists,
                "dns": seen["dns"] - lists, "full": first_end - lists,
                "logged_first": "first" in log.seen, "first_line": log.lines.get("first", "")}
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.close()
        topo.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--datapaths", default="iptables:legacy,iptables:nft,nftables")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--cold", default="both", choices=["both", "on", "off"])
    ap.add_argument("--probe-timeout", type=float, default=0.05,
                    help="seconds each probe waits (more in the emulated VM)")
    ap.add_argument("--show-log", action="store_true",
                    help="print svcproxy's log up to the first full sync (with --log-level "
                         "debug: what it did between the lists and the first write)")
    args = ap.parse_args()
    PROBE_TIMEOUT[0] = args.probe_timeout
    if os.geteuid() != 0:
        print("cold_start.py needs root (network namespaces)", file=sys.stderr)
        return 2
    objs = objects(args.services)
    print(f"{args.services:,} Services x 5 endpoints + default/kubernetes and "
          f"kube-system/kube-dns; seconds after the lists completed:")
    print(f"{'datapath':<20} {'cold start':<11} {'10.96.0.1':>10} {'DNS':>8} {'all':>9}")
    for spec in args.datapaths.split(","):
        datapath, _, backend = spec.partition(":")
        for cold in {"both": (True, False), "on": (True,), "off": (False,)}[args.cold]:
            r = run_one(args.services, datapath, backend or "nft", cold, objs, args.timeout,
                        args.show_log)
            assert r["logged_first"] == cold, "the cold start ran (or did not) unexpectedly"
            print(f"{r['datapath']:<20} {'on' if cold else 'off':<11} {r['api']:>9.2f}s "
                  f"{r['dns']:>7.2f}s {r['full']:>8.2f}s", flush=True)
            if r["first_line"]:
                print(f"    ({r['first_line']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
