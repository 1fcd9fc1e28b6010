"""Soak: `svcproxy run` under continuous endpoint churn for a long time (root).

The whole path as deployed: the real `svcproxy run --kubeconfig` process,
listing and watching tests/apiserver.py (the real list/watch wire protocol),
programming the iptables datapath in a scratch network namespace. N services x
5 endpoints; every 1/RATE s one EndpointSlice changes (one endpoint replaced).
Every INTERVAL s it samples the process: RSS, open file descriptors, threads,
and from /metrics the syncs done and their mean duration in that interval, and
network programming latency. The point is flatness: kube-proxy once leaked
8 GB in its EndpointSlice cache (kubernetes #128928).

    python benchmarks/soak.py [--services 1000] [--minutes 30] [--rate 10]
                              [--interval 60] [--backend nft|legacy]

Prints one row per interval and a verdict (first vs last third); results are
in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

from apiserver import FakeAPIServer  # noqa: E402
from factories import endpoint, node, service, slice_  # noqa: E402
from netns import Topology  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_sample(pid: int) -> tuple[float, int, int]:
    """(RSS MB, open fds, threads) of a process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd")), threads


def metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("kubeproxy_sync_proxy_rules_duration_seconds_sum",
                          "kubeproxy_sync_proxy_rules_duration_seconds_count",
                          "kubeproxy_network_programming_duration_seconds_sum",
                          "kubeproxy_network_programming_duration_seconds_count"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def slice_for(i: int, generation: int) -> dict[str, object]:
    eps = [endpoint(f"10.{100 + i // 250}.{i % 250}.{10 + (generation + k) % 200}",
                    f"node-{k}") for k in range(5)]
    return slice_(f"svc-{i}", endpoints=eps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=10.0, help="endpoint changes per second")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    args = ap.parse_args()

    topo = Topology()
    server = FakeAPIServer()
    tmp = Path(tempfile.mkdtemp(prefix="svcproxy-soak-"))
    proc: subprocess.Popen[str] | None = None
    try:
        topo.create_node()
        server.apply(node("node-a", ips=["192.168.100.1"]))
        generation = [0] * args.services
        for i in range(args.services):
            server.apply(service(f"svc-{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}"))
            server.apply(slice_for(i, 0))
        metrics_address = f"127.0.0.1:{free_port()}"
        config = tmp / "config.yaml"
        config.write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: iptables
            clusterCIDR: 10.0.0.0/8
            metricsBindAddress: {metrics_address}
            healthzBindAddress: 127.0.0.1:{free_port()}
            iptables: {{minSyncPeriod: 1s, syncPeriod: 30s}}
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [conntrack, metallb]
            datapaths: [iptables]
            datapathOptions:
              iptables: {{netns: {topo.node}, backend: {args.backend}}}
        """))
        svcproxy = str(Path(sys.executable).parent / "svcproxy")
        proc = subprocess.Popen(
            [svcproxy, "--log-level", "warning", "run",
             "--kubeconfig", str(server.kubeconfig(tmp / "kubeconfig")),
             "--config", str(config), "--node", "node-a", "--status-socket",
             str(tmp / "status.sock")],
            stdout=subprocess.DEVNULL, stderr=(tmp / "svcproxy.log").open("w"), text=True)
        deadline = time.monotonic() + 600
        while True:
            try:
                if metrics(metrics_address).get(
                        "kubeproxy_sync_proxy_rules_duration_seconds_count", 0) >= 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"svcproxy did not sync; see {tmp / 'svcproxy.log'}")
            time.sleep(1)
        print(f"soak: {args.services} services x 5 endpoints, {args.rate:g} endpoint "
              f"changes/s for {args.minutes:g} min, iptables-{args.backend}; svcproxy pid "
              f"{proc.pid}")
        print(f"{'min':>6} {'RSS MB':>8} {'fds':>5} {'threads':>7} {'changes':>8} "
              f"{'syncs':>6} {'mean sync s':>11} {'mean prog s':>11}")
        rows = []
        start = time.monotonic()
        last = metrics(metrics_address)
        changes = 0
        next_sample = start + args.interval
        rng = random.Random(1)
        period = 1.0 / args.rate
        tick = time.monotonic()
        while time.monotonic() - start < args.minutes * 60:
            i = rng.randrange(args.services)
            generation[i] += 1
            server.apply(slice_for(i, generation[i]))
            changes += 1
            tick += period
            time.sleep(max(0.0, tick - time.monotonic()))
            if time.monotonic() >= next_sample:
                next_sample += args.interval
                rss, fds, threads = proc_sample(proc.pid)
                now = metrics(metrics_address)
                syncs = (now["kubeproxy_sync_proxy_rules_duration_seconds_count"]
                         - last["kubeproxy_sync_proxy_rules_duration_seconds_count"])
                sync_s = (now["kubeproxy_sync_proxy_rules_duration_seconds_sum"]
                          - last["kubeproxy_sync_proxy_rules_duration_seconds_sum"])
                progs = (now["kubeproxy_network_programming_duration_seconds_count"]
                         - last["kubeproxy_network_programming_duration_seconds_count"])
                prog_s = (now["kubeproxy_network_programming_duration_seconds_sum"]
                          - last["kubeproxy_network_programming_duration_seconds_sum"])
                last = now
                row = ((time.monotonic() - start) / 60, rss, fds, threads, changes, syncs,
                       sync_s / syncs if syncs else 0.0, prog_s / progs if progs else 0.0)
                rows.append(row)
                changes = 0
                print(f"{row[0]:6.1f} {row[1]:8.1f} {row[2]:5d} {row[3]:7d} {row[4]:8d} "
                      f"{row[5]:6.0f} {row[6]:11.3f} {row[7]:11.3f}", flush=True)
        if proc.poll() is not None:
            raise SystemExit(f"svcproxy exited ({proc.returncode}); see {tmp / 'svcproxy.log'}")
        third = max(1, len(rows) // 3)
        first, final = rows[:third], rows[-third:]

        def mean(rs: list[tuple[float, ...]], k: int) -> float:
            return sum(r[k] for r in rs) / len(rs)

        print(f"first third: RSS {mean(first, 1):.1f} MB, fds {mean(first, 2):.0f}, "
              f"mean sync {mean(first, 6):.3f} s; last third: RSS {mean(final, 1):.1f} MB, "
              f"fds {mean(final, 2):.0f}, mean sync {mean(final, 6):.3f} s")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.close()
        topo.close()


if __name__ == "__main__":
    sys.exit(main())
