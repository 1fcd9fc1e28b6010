"""Network programming latency under churn (issue #16, item 4), as a node sees
it: `svcproxy run --kubeconfig` against tests/apiserver.py (the real list/watch
wire protocol) holding N Services x 5 endpoints, then a steady R EndpointSlice
changes per second for D seconds (one endpoint's readiness flipped, the
controller's last-change-trigger-time set to the moment of the change).

Reported, for the churn only (the first sync's observations are subtracted):
- kubeproxy_network_programming_duration_seconds from svcproxy's /metrics:
  mean (sum/count) and p50/p99 interpolated inside kube-proxy's buckets
  (0.25, 0.5, 1, 2, ... s: coarse around 1 s);
- the same latency per change from outside: the end of the first sync that
  started after the change was written to the API server (sync records polled
  from the status file every 50 ms), so not bucketed;
- the CPU the svcproxy process and its children (the restore tools)
  used during the churn (cores) and its peak RSS.

The datapath programs a network namespace the benchmark creates (no traffic
is sent). Root; `--datapath iptables --backend legacy` is issue #16's target
case (p99 <= minSyncPeriod + 200 ms).

    sudo python benchmarks/churn_latency.py [--services 10000] [--rate 50]
        [--seconds 60] [--datapath iptables] [--backend legacy] [--min-sync 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from apiserver import FakeAPIServer  # noqa: E402
from factories import node  # noqa: E402
from manifest_scale import cluster as manifest_cluster  # noqa: E402
from netns import free_port  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

NP = "kubeproxy_network_programming_duration_seconds"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def cluster(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(services, slices): N ClusterIP services x 5 endpoints (manifest_scale's)."""
    objs = manifest_cluster(n)
    return ([o for o in objs if o["kind"] == "Service"],
            [o for o in objs if o["kind"] == "EndpointSlice"])


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def histogram(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
              family: str = "IPv4") -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], count, sum) of one histogram."""
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
                     if n == f"{name}_bucket" and dict(labels).get("ip_family") == family)
    count = samples.get((f"{name}_count", (("ip_family", family),)), 0.0)
    total = samples.get((f"{name}_sum", (("ip_family", family),)), 0.0)
    return buckets, count, total


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = le, count
    return lower


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # its own and its reaped children's (iptables-restore, ipset, nft)
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class SyncLog(threading.Thread):
    """Every successful sync, {start: end} in wall time, from the status file
    (`svcproxy run --status-file`; each sync rewrites it by rename)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.syncs: dict[float, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                rec = json.loads(self.path.read_text())["last_successful_sync"]
            except (OSError, ValueError, KeyError):
                continue
            if rec:
                self.syncs[rec["time"]] = rec["time"] + rec["duration_seconds"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = f"svpchurn{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="svp-churn-"))
    server = FakeAPIServer()
    proc: subprocess.Popen[bytes] | None = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        services, slices = cluster(args.services)
        server.apply(node("node-a", ips=["192.168.100.1"]))
        for obj in (*services, *slices):
            server.apply(obj)
        metrics = f"127.0.0.1:{free_port()}"
        (work / "config.yaml").write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: {args.datapath}
            metricsBindAddress: {metrics}
            healthzBindAddress: ""
            iptables: {{minSyncPeriod: {args.min_sync}s}}
            nftables: {{minSyncPeriod: {args.min_sync}s}}
            ipvs: {{minSyncPeriod: {args.min_sync}s}}
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [conntrack]
            {f"fullSyncPeriod: {args.full_sync_period}" if args.full_sync_period else ""}
            datapathOptions:
              iptables: {{netns: {ns}, backend: {args.backend}}}
              nftables: {{netns: {ns}}}
              ipvs: {{netns: {ns}, sysctlBackup: {work / 'sysctl.json'}}}
        """))
        svcproxy = str(Path(sys.executable).parent / "svcproxy")
        started = time.time()
        with open(work / "svcproxy.log", "wb") as log:
            proc = subprocess.Popen([svcproxy, "run", "--kubeconfig",
                                     str(server.kubeconfig(work / "kubeconfig")),
                                     "--config", str(work / "config.yaml"), "--node", "node-a",
                                     "--status-socket", "", "--status-file",
                                     str(work / "status.json")],
                                    stdout=subprocess.DEVNULL, stderr=log)
        watcher = SyncLog(work / "status.json")
        watcher.start()
        deadline = time.monotonic() + args.first_sync_timeout
        while not watcher.syncs:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("no first sync:\n"
                                 + (work / "svcproxy.log").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        first_sync = max(watcher.syncs.values()) - started
        time.sleep(args.min_sync + 0.5)  # let the first sync's followers settle
        before = scrape(metrics)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        rng = random.Random(1)
        written: list[float] = []
        total = int(args.rate * args.seconds)
        start = time.monotonic()
        for n in range(total):
            delay = start + n / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = rng.randrange(args.services)
            obj = copy.deepcopy(slices[i])
            ep = obj["endpoints"][rng.randrange(5)]
            ep["conditions"] = {"ready": not ep.get("conditions", {}).get("ready", True)}
            slices[i] = copy.deepcopy(obj)
            now = time.time()
            obj["metadata"]["annotations"] = {TRIGGER: dt.datetime.fromtimestamp(
                now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
            server.apply(obj)
            written.append(now)
        churn_wall = time.monotonic() - start
        # wait for the last changes to be programmed
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            after = scrape(metrics)
            if histogram(after, NP)[1] - histogram(before, NP)[1] >= total:
                break
            time.sleep(0.2)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        rss_peak, rss_now = status_kb(proc.pid, "VmHWM"), status_kb(proc.pid, "VmRSS")
        watcher.stop.set()
        b0, c0, s0 = histogram(before, NP)
        b1, c1, s1 = histogram(after, NP)
        delta = [(le, v - dict(b0).get(le, 0.0)) for le, v in b1]
        syncs = sorted(watcher.syncs.items())
        outside = []
        for w in written:
            end = next((e for s, e in syncs if s >= w), None)
            if end is not None:
                outside.append(end - w)
        outside.sort()
        count = c1 - c0
        return {
            "services": args.services, "rate": args.rate, "seconds": round(churn_wall, 1),
            "datapath": f"{args.datapath}" + (f" ({args.backend})"
                                              if args.datapath == "iptables" else ""),
            "min_sync": args.min_sync, "first_sync": round(first_sync, 2),
            "changes": total, "observed": int(count),
            "mean": (s1 - s0) / count if count else float("nan"),
            "p50": quantile(0.5, delta), "p99": quantile(0.99, delta),
            "outside_p50": outside[len(outside) // 2] if outside else float("nan"),
            "outside_p99": outside[min(len(outside) - 1, int(len(outside) * 0.99))]
            if outside else float("nan"),
            "syncs": sum(1 for s, _ in syncs if s >= written[0]) if written else 0,
            "cpu": cpu, "rss_peak_mb": rss_peak / 1024, "rss_mb": rss_now / 1024,
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=50.0, help="endpoint changes per second")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--datapath", default="iptables", choices=["iptables", "nftables", "ipvs"],
                    help="ipvs: inside the VM (benchmarks/run-in-vm.sh)")
    ap.add_argument("--backend", default="legacy", choices=["legacy", "nft"])
    ap.add_argument("--min-sync", type=float, default=1.0, help="minSyncPeriod, seconds")
    ap.add_argument("--first-sync-timeout", type=float, default=900.0)
    ap.add_argument("--full-sync-period", default="",
                    help="fullSyncPeriod (e.g. 1h); default: svcproxy's adaptive period")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("churn_latency.py needs root (network namespaces)", file=sys.stderr)
        return 2
    r = run(args)
    target = r["min_sync"] + 0.2
    print(f"{r['services']:,} services, {r['rate']:g} changes/s for {r['seconds']} s, "
          f"{r['datapath']}, minSyncPeriod {r['min_sync']:g} s, fullSyncPeriod "
          f"{args.full_sync_period or 'adaptive'}; first sync "
          f"{r['first_sync']} s after start")
    print(f"  network programming (metric): mean {r['mean']:.3f} s, p50 {r['p50']:.3f} s, "
          f"p99 {r['p99']:.3f} s (target <= {target:.1f} s); {r['observed']}/{r['changes']} "
          f"changes observed")
    print(f"  per change from outside:      p50 {r['outside_p50']:.3f} s, "
          f"p99 {r['outside_p99']:.3f} s; {r['syncs']} syncs")
    print(f"  svcproxy CPU {r['cpu']:.2f} cores during the churn; RSS {r['rss_mb']:.0f} MB, "
          f"peak {r['rss_peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
