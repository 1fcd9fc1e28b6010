"""iptables datapath benchmark (root; runs in scratch network namespaces).

For N services x 5 endpoints:
  full      svcproxy's first full sync (plan + render + read + restore) vs
            `iptables-restore --noflush` of the identical ruleset, both run the
            same way (`ip netns exec NS ...`) into an empty namespace
  resync    a periodic full sync with nothing changed (reads, compares, writes
            nothing)
  partial   one endpoint of one service changes: svcproxy's partial sync
  latency   median TCP connect time from a client namespace through a VIP whose
            KUBE-SERVICES rule is matched last, to a real backend

    python benchmarks/iptables_sync.py [--sizes 1000,10000] [--backend nft|legacy]
                                       [--latency-sizes 10,1000,10000]

Prints a table of seconds and ratios (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

from factories import ProxyHarness, endpoint, service, slice_  # noqa: E402
from netns import Topology, sh  # noqa: E402

from svcproxy.bus import Event, EventType  # noqa: E402
from svcproxy.model import parse_object  # noqa: E402
from svcproxy.proxy import Proxy  # noqa: E402

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def make_proxy(netns: str, backend: str) -> Proxy:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: iptables
        clusterCIDR: 10.0.0.0/8
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [iptables]
        datapathOptions:
          iptables: {{netns: {netns}, backend: {backend}}}
    """)
    return ProxyHarness(text, "iptables", ["192.168.100.1"]).proxy


def publish(proxy: Proxy, obj: dict[str, Any], kind: EventType = EventType.ADDED) -> None:
    proxy.bus.publish(Event(kind, parse_object(obj)))


def ip(i: int, base: int) -> str:
    return f"10.{base + i // 65536}.{(i // 256) % 256}.{i % 256}"


def load_services(proxy: Proxy, n: int, target_pod: str | None = None) -> None:
    """n services, 5 endpoints each; "zz-target" sorts last in KUBE-SERVICES."""
    for i in range(n):
        name = f"svc-{i:05d}" if i < n - 1 or target_pod is None else "zz-target"
        publish(proxy, service(name, "bench", cluster_ip=ip(i, 96), ports=HTTP))
        eps = [endpoint(ip(i * 5 + j, 128)) for j in range(5)]
        if name == "zz-target":
            eps = [endpoint(target_pod)]
        publish(proxy, slice_(name, "bench", endpoints=eps,
                              ports=[{"name": "http", "port": 8080}]))


def kernel_of(proxy: Proxy) -> Any:
    plugin = next(p.plugin for p in proxy.plugins.plugins if p.name == "iptables")
    return plugin.families[4].kernel


def count_rules(netns: str, backend: str) -> int:
    out = sh(f"iptables-{backend}-save", netns=netns, timeout=1800).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A "))


def bench_sync(n: int, backend: str) -> dict[str, float]:
    topo = Topology(prefix=f"svpb{n}")
    try:
        topo.create_node()
        proxy = make_proxy(topo.node, backend)
        load_services(proxy, n)
        plugin = next(p.plugin for p in proxy.plugins.plugins if p.name == "iptables")
        plugin._family(4).kernel.keep_last_restore = True  # the raw tool replays it
        t0 = time.perf_counter()
        result = proxy.sync(full=True)
        full = time.perf_counter() - t0
        assert result.ok, result.error
        text = kernel_of(proxy).last_restore
        rules = count_rules(topo.node, backend)

        t0 = time.perf_counter()
        re = proxy.sync(full=True)
        resync = time.perf_counter() - t0
        assert re.ok and re.apply is not None and re.apply.changes == 0

        publish(proxy, slice_("svc-00007", "bench", endpoints=[
            endpoint(ip(7 * 5 + j, 128)) for j in range(4)] + [endpoint("10.250.0.1")],
            ports=[{"name": "http", "port": 8080}]), EventType.MODIFIED)
        t0 = time.perf_counter()
        part = proxy.sync()
        partial = time.perf_counter() - t0
        assert part.ok and not part.full
    finally:
        topo.close()

    # the floor: the identical ruleset restored by the tool itself, same way
    floor = Topology(prefix=f"svpr{n}")
    try:
        floor.create_node()
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", floor.node, f"iptables-{backend}-restore",
                        "-w", "5", "--noflush"], input=text, text=True, check=True,
                       timeout=1800)
        raw = time.perf_counter() - t0
    finally:
        floor.close()
    return {"services": n, "rules": rules, "full": full, "raw_restore": raw, "resync": resync,
            "partial": partial, "phases": result.phases, "partial_phases": part.phases,
            "resync_phases": re.phases}


def bench_latency(n: int, backend: str, samples: int = 400,
                  make: Callable[[str], Proxy] | None = None) -> float:
    """Median connect time through the last service's VIP, in µs; `make`
    builds the proxy for a namespace (default: this benchmark's iptables one)."""
    topo = Topology(prefix=f"svpl{n}")
    try:
        topo.create_node()
        topo.add_client("c1", "192.168.100.2", "192.168.100.1")
        topo.add_pod("target", "10.250.0.1")
        proxy = make(topo.node) if make is not None else make_proxy(topo.node, backend)
        load_services(proxy, n, target_pod="10.250.0.1")
        assert proxy.sync(full=True).ok
        vip = ip(n - 1, 96)
        code = textwrap.dedent(f"""
            import socket, statistics, time, json
            out = []
            for _ in range({samples}):
                s = socket.socket()
                t = time.perf_counter()
                s.connect(("{vip}", 80))
                out.append(time.perf_counter() - t)
                s.close()
            print(json.dumps(statistics.median(out)))
        """)
        proc = sh(sys.executable, "-c", code, netns=topo.clients["c1"], timeout=300)
        return float(json.loads(proc.stdout)) * 1e6
    finally:
        topo.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--latency-sizes", default="10,1000,10000")
    p.add_argument("--backend", default="nft", choices=["nft", "legacy"])
    p.add_argument("--repeat", type=int, default=5,
                   help="runs per size up to 2,000 services (medians are printed); larger "
                   "sizes run once")
    args = p.parse_args()
    print(f"iptables datapath benchmark, backend {args.backend} "
          f"(medians of {args.repeat} runs up to 2,000 services)")
    print(f"{'services':>9} {'rules':>7} {'svcproxy full':>14} {'iptables-restore':>17} "
          f"{'ratio':>6} {'resync':>8} {'partial':>8} {'partial/full':>13}")
    for n in (int(s) for s in args.sizes.split(",") if s):
        runs = [bench_sync(n, args.backend) for _ in range(args.repeat if n <= 2000 else 1)]
        r = {k: statistics.median(x[k] for x in runs) if isinstance(runs[0][k], float)
             else runs[len(runs) // 2][k] for k in runs[0]}
        print(f"{n:>9} {r['rules']:>7} {r['full']:>13.3f}s {r['raw_restore']:>16.3f}s "
              f"{r['full'] / r['raw_restore']:>6.2f} {r['resync']:>7.3f}s {r['partial']:>7.3f}s "
              f"{100 * r['partial'] / r['full']:>12.1f}%")
        phases = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r["phases"].items()))
        print(f"{'':>9} full sync phases: {phases}")
        phases = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r["resync_phases"].items()))
        print(f"{'':>9} resync phases: {phases}")
        phases = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r["partial_phases"].items()))
        print(f"{'':>9} partial sync phases: {phases}")
    if args.latency_sizes:
        print("new-connection latency through the VIP matched last (median connect):")
        for n in (int(s) for s in args.latency_sizes.split(",") if s):
            print(f"{n:>9} services: {bench_latency(n, args.backend):8.1f} us")


if __name__ == "__main__":
    main()
