"""IPVS datapath benchmark; runs inside the virtme-ng VM (real IPVS kernel).

    benchmarks/run-in-vm.sh benchmarks/ipvs_sync.py [--sizes 1000,10000]

For N services x 5 real servers, each measurement in its own fresh network
namespace (IPVS state, including the kernel's trash list of deleted real
servers, is per namespace, so runs do not slow each other down):
  svcproxy full   a full sync that creates every service (plan, kernel read,
                  batched netlink writes, addresses, ipsets and iptables helper
                  rules), after one warm-up sync of an empty cluster (imports,
                  backend detection and sysctls happen once per process)
  ipvsadm -R      the same virtual and real servers restored by ipvsadm
  ipvs only       the IPVS part of svcproxy's sync (its netlink batch)
  change          one endpoint of one service changes: svcproxy's partial sync
                  (median of five such changes to different services)
  resync          the periodic full sync afterwards, nothing changed: the
                  kernel (IPVS, kube-ipvs0, ipsets, helper chains) is read
                  back and compared; only what differs is written
  RSS             peak resident memory of this process

Software emulation makes every absolute number slow; the ratios are the point.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from factories import ProxyHarness, endpoint, service, slice_  # noqa: E402

from svcproxy.bus import Event, EventType  # noqa: E402
from svcproxy.model import parse_object  # noqa: E402
from svcproxy.proxy import Proxy  # noqa: E402

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def ip(i: int, base: int) -> str:
    return f"10.{base + i // 65536}.{(i // 256) % 256}.{i % 256}"


def netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)


def make_proxy(ns: str) -> Proxy:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        clusterCIDR: 10.128.0.0/9
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [ipvs]
        datapathOptions:
          ipvs: {{netns: {ns}, sysctlBackup: /tmp/bench-sysctl-{ns}.json}}
    """)
    return ProxyHarness(text, "ipvs", ["192.168.100.1"]).proxy


def publish(proxy: Proxy, obj: dict[str, Any], kind: EventType = EventType.ADDED) -> None:
    proxy.bus.publish(Event(kind, parse_object(obj)))


def load(proxy: Proxy, n: int) -> None:
    for i in range(n):
        publish(proxy, service(f"svc-{i:05d}", "bench", cluster_ip=ip(i, 96), ports=HTTP))
        publish(proxy, slice_(f"svc-{i:05d}", "bench",
                              endpoints=[endpoint(ip(i * 5 + j, 128)) for j in range(5)],
                              ports=[{"name": "http", "port": 8080}]))


def ipvsadm_rules(n: int) -> str:
    lines = []
    for i in range(n):
        vip = ip(i, 96)
        lines.append(f"-A -t {vip}:80 -s rr")
        lines += [f"-a -t {vip}:80 -r {ip(i * 5 + j, 128)}:8080 -m -w 1" for j in range(5)]
    return "\n".join(lines) + "\n"


def bench(n: int) -> dict[str, float]:
    ours, raw = f"bench-ours-{n}", f"bench-raw-{n}"
    netns(ours)
    netns(raw)
    try:
        proxy = make_proxy(ours)
        # warm up: module imports, backend detection, sysctls and the first
        # (empty) reads happen once per process, not per sync
        assert proxy.sync(full=True).ok
        load(proxy, n)
        t0 = time.perf_counter()
        result = proxy.sync(full=True)
        full = time.perf_counter() - t0
        assert result.ok, result.error
        rules = ipvsadm_rules(n)
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", raw, "ipvsadm", "-R"], input=rules, text=True,
                       check=True)
        restore = time.perf_counter() - t0
        # one endpoint of one service changes; five times (different services),
        # the median counts: one partial sync is tens of milliseconds here, and
        # the emulator's noise is of the same order
        changes = []
        for k, svc in enumerate((7, n // 5, n // 3, n // 2, n - 3)):
            publish(proxy, slice_(f"svc-{svc:05d}", "bench",
                                  endpoints=[endpoint(ip(svc * 5 + j, 128)) for j in range(4)]
                                  + [endpoint(f"10.250.0.{k + 1}")],
                                  ports=[{"name": "http", "port": 8080}]), EventType.MODIFIED)
            t0 = time.perf_counter()
            part = proxy.sync()
            changes.append((time.perf_counter() - t0, part))
            assert part.ok and not part.full
        changes.sort(key=lambda c: c[0])
        change, part = changes[len(changes) // 2]
        # the periodic full sync: nothing changed, everything is read back
        # from the kernel and compared
        t0 = time.perf_counter()
        again = proxy.sync(full=True)
        resync = time.perf_counter() - t0
        assert again.ok and again.full, again.error
        for what, res in (("full", result), ("one change (median)", part),
                          ("resync", again)):
            phases = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(res.phases.items()))
            print(f"  {n} services, {what} sync phases: {phases}", flush=True)
        return {"full": full, "restore": restore, "ipvs": result.phases.get("apply.ipvs", 0.0),
                "change": change, "resync": resync, "rss_mb": resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        for ns in (ours, raw):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000")
    args = p.parse_args()
    print("IPVS datapath benchmark (inside the VM, software emulation)")
    print(f"{'services':>9} {'svcproxy full':>14} {'(ipvs part)':>12} {'ipvsadm -R':>11} "
          f"{'ratio':>6} {'one change':>11} {'resync':>8} {'peak RSS':>9}")
    rows = {}
    for n in (int(s) for s in args.sizes.split(",") if s):
        r = bench(n)
        rows[n] = r
        print(f"{n:>9} {r['full']:>13.2f}s {r['ipvs']:>11.2f}s {r['restore']:>10.2f}s "
              f"{r['full'] / r['restore']:>6.2f} {r['change']:>10.3f}s {r['resync']:>7.2f}s "
              f"{r['rss_mb']:>7.0f}MB",
              flush=True)
    if len(rows) >= 2:
        small, large = min(rows), max(rows)
        print(f"one change at {large} vs {small} services: "
              f"{rows[large]['change'] / rows[small]['change']:.2f}x")


if __name__ == "__main__":
    main()
