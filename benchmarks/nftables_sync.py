"""nftables datapath benchmark (root; runs in scratch network namespaces).

For N services x 5 endpoints, each size in its own process (for its peak RSS):
  full      svcproxy's first full sync (plan + render + the declarations
            through `nft -f` + the rules and elements over netlink) vs
            `nft -f` of the identical statements, and vs `nft -f` of the same
            cluster in the plainest numgen layout (a dispatch map, one chain
            per service whose numgen rules DNAT directly: no endpoint chains,
            no masquerade or filter chains): how much the layout itself costs
  resync    a periodic full sync with nothing changed (lists the table,
            compares, writes nothing)
  partial   one endpoint of one service changes: svcproxy's partial sync
            (median of five, over netlink as it runs; and of five more with
            the netlink writer off, through `nft -f`); "kernel" is the same
            batch committed by a bare netlink client: the kernel's own cost
  latency   median TCP connect time from a client namespace through the VIP of
            the last service to a real backend, for nftables, iptables-nft and
            iptables-legacy (the same harness as benchmarks/iptables_sync.py)

    python benchmarks/nftables_sync.py [--sizes 1000,10000,50000]
                                       [--latency-sizes 10,1000,10000] [--plot FILE]

Prints a table of seconds and ratios and, with matplotlib installed (pip
install matplotlib), draws the latency chart (benchmarks/latency.png); see
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

from factories import ProxyHarness, endpoint, slice_  # noqa: E402
from iptables_sync import bench_latency as iptables_latency  # noqa: E402
from iptables_sync import ip, load_services, publish  # noqa: E402
from netns import Topology  # noqa: E402

from svcproxy.bus import EventType  # noqa: E402
from svcproxy.plugins.kernel import nft_netlink  # noqa: E402
from svcproxy.proxy import Proxy  # noqa: E402


def make_proxy(netns: str, datapath: str = "nftables", backend: str = "nft") -> Proxy:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: {datapath}
        clusterCIDR: 10.0.0.0/8
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        datapaths: [{datapath}]
        datapathOptions:
          nftables: {{netns: {netns}}}
          iptables: {{netns: {netns}, backend: {backend}}}
          ipvs: {{netns: {netns}, sysctlBackup: /tmp/{netns}-sysctl.json}}
    """)
    return ProxyHarness(text, datapath, ["192.168.100.1"]).proxy


def plain_numgen(n: int) -> str:
    """The same services and endpoints in the plainest numgen layout."""
    out = ["add table ip plain",
           "add chain ip plain pre { type nat hook prerouting priority -100 ; }",
           "add map ip plain svc { type ipv4_addr . inet_proto . inet_service : verdict ; }"]
    for i in range(n):
        out.append(f"add chain ip plain s{i}")
    for i in range(n):
        eps = [ip(i * 5 + j, 128) for j in range(5)]
        for j, e in enumerate(eps):
            test = f"numgen random mod {5 - j} 0 " if j < 4 else ""
            out.append(f"add rule ip plain s{i} meta l4proto tcp {test}dnat to {e}:8080")
    out.append("add rule ip plain pre ip daddr . meta l4proto . th dport vmap @svc")
    for k in range(0, n, 1000):
        items = ", ".join(f"{ip(i, 96)} . tcp . 80 : goto s{i}" for i in range(k, min(n, k + 1000)))
        out.append(f"add element ip plain svc {{ {items} }}")
    return "\n".join(out) + "\n"


def nft_f(text: str, prefix: str) -> float:
    """`nft -f` of `text` into a fresh namespace, run the way svcproxy runs it."""
    topo = Topology(prefix=prefix)
    try:
        topo.create_node()
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", topo.node, "nft", "-f", "-"], input=text,
                       text=True, check=True, timeout=3600)
        return time.perf_counter() - t0
    finally:
        topo.close()


def bench_one(n: int) -> dict[str, Any]:
    """One size, in this process: svcproxy's syncs, then the raw tools."""
    topo = Topology(prefix=f"svnb{n}")
    sent: list[str] = []
    try:
        topo.create_node()
        proxy = make_proxy(topo.node)
        load_services(proxy, n)
        plugin = next(p.plugin for p in proxy.plugins.plugins if p.name == "nftables")
        kernel = plugin._family(4).kernel
        real_run = kernel.run
        inside: list[bool] = []

        def record(text: str) -> None:
            if not inside:
                sent.append(text)
            real_run(text)

        def record_two(first: str, second: str) -> None:
            sent.extend((first, second))
            inside.append(True)
            try:
                real_two(first, second)
            finally:
                inside.clear()

        real_two = kernel.run_two
        kernel.run = record  # type: ignore[method-assign]
        kernel.run_two = record_two  # type: ignore[method-assign]
        t0 = time.perf_counter()
        result = proxy.sync(full=True)
        full = time.perf_counter() - t0
        assert result.ok, result.error
        # a new table is two transactions (declarations, then the rules and
        # elements); `nft -f` gets both as one
        first = "".join(sent)
        chains = sum(1 for line in first.splitlines() if line.startswith("add chain"))
        rules = sum(1 for line in first.splitlines() if line.startswith("add rule"))
        t0 = time.perf_counter()
        re = proxy.sync(full=True)
        resync = time.perf_counter() - t0
        assert re.ok and re.apply is not None and re.apply.changes == 0, re
        partials: dict[str, list[float]] = {"netlink": [], "nft": []}
        netlink_before = kernel.netlink_transactions
        part = None
        for k in range(10):
            # one endpoint of one service changes, back and forth; the first
            # five over netlink (the default), the last five through `nft -f`
            writer = "netlink" if k < 5 else "nft"
            kernel.netlink = writer == "netlink"
            last = "10.250.0.1" if k % 2 == 0 else ip(7 * 5 + 4, 128)
            publish(proxy, slice_("svc-00007", "bench", endpoints=[
                endpoint(ip(7 * 5 + j, 128)) for j in range(4)] + [endpoint(last)],
                ports=[{"name": "http", "port": 8080}]), EventType.MODIFIED)
            t0 = time.perf_counter()
            part = proxy.sync()
            partials[writer].append(time.perf_counter() - t0)
            assert part.ok and not part.full
            if k == 0:
                partial_text = sent[-1]
                assert kernel.netlink_transactions == netlink_before + 1, \
                    "the partial sync did not use netlink"
        assert part is not None
        # the kernel's own part: the first change's batch committed again and
        # again by a bare netlink client (flush and re-add: the same table)
        batch = nft_netlink.compile_batch(partial_text, 4, "kube-proxy", kernel.key_types.get)
        channel = nft_netlink.Channel(topo.node)
        commits = []
        for _ in range(5):
            t0 = time.perf_counter()
            channel.commit(batch)
            commits.append(time.perf_counter() - t0)
        channel.close()
    finally:
        topo.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw = nft_f(first, f"svnr{n}")
    plain = nft_f(plain_numgen(n), f"svnp{n}")
    return {"services": n, "chains": chains, "rules": rules, "full": full, "raw": raw,
            "plain": plain, "resync": resync,
            "partial": statistics.median(partials["netlink"]),
            "partial_nft": statistics.median(partials["nft"]),
            "partial_kernel": statistics.median(commits),
            "partial_statements": len(partial_text.splitlines()), "rss_mb": rss,
            "phases": result.phases, "resync_phases": re.phases,
            "partial_phases": part.phases}


def bench_latency(n: int, datapath: str, backend: str = "nft") -> float:
    return iptables_latency(n, backend, make=lambda ns: make_proxy(ns, datapath, backend))


def plot(latency: dict[str, dict[int, float]], path: Path,
         emulated: dict[int, float] | None = None) -> bool:
    """The chart: host datapaths on the left; IPVS measured in the VM (its CPU
    emulated, so only its shape compares) on the right, when recorded."""
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no chart; pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if emulated else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 + 3.5 * (panels - 1), 4.2), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [2, 1][:panels]})
    ax = axes[0][0]
    styles = {"nftables": ("tab:green", "o"), "iptables-nft": ("tab:red", "s"),
              "iptables-legacy": ("tab:orange", "^")}
    for name, points in latency.items():
        xs = sorted(points)
        color, marker = styles.get(name, ("tab:gray", "x"))
        ax.plot(xs, [points[x] for x in xs], marker=marker, color=color, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("services (x 5 endpoints)")
    ax.set_ylabel("new TCP connection, median (µs)")
    ax.set_title("Through the last service (host, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_ylim(bottom=0)
    if emulated:
        vm = axes[0][1]
        xs = sorted(emulated)
        vm.plot(xs, [emulated[x] for x in xs], marker="D", color="tab:blue", label="ipvs")
        vm.set_xscale("log")
        vm.set_xlabel("services (x 5 endpoints)")
        vm.set_title("IPVS in the VM (emulated CPU)")
        vm.grid(True, which="both", alpha=0.3)
        vm.legend()
        vm.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,50000")
    p.add_argument("--latency-sizes", default="10,1000,10000")
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "latency.png"))
    p.add_argument("--latency-datapaths", default="nftables,iptables-nft,iptables-legacy",
                   help="which datapaths the latency part measures (ipvs: in the VM, "
                   "benchmarks/run-in-vm.sh)")
    p.add_argument("--latency-json", help="write the latency numbers here")
    p.add_argument("--ipvs-latency", default=str(ROOT / "benchmarks" / "ipvs_latency_vm.json"),
                   help="IPVS latency measured in the VM (--latency-json of a run there), "
                   "drawn beside the host's")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per size (the one with the median ratio is shown)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(bench_one(args.one)))
        return
    print("nftables datapath benchmark (one process per size)")
    print(f"{'services':>9} {'chains':>7} {'rules':>7} {'svcproxy full':>14} {'nft -f same':>12} "
          f"{'ratio':>6} {'nft -f plain':>13} {'ratio':>6} {'resync':>8} {'partial':>8} "
          f"{'(nft -f)':>8} {'kernel':>8} {'RSS':>7}")
    results = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        runs = []
        for _ in range(args.repeat):
            proc = subprocess.run([sys.executable, __file__, "--one", str(n)],
                                  capture_output=True, text=True, check=True, timeout=7200)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # this machine's speed drifts by up to 2x between minutes: each run's
        # ratio is of numbers taken seconds apart; the run shown is the one
        # with the median ratio to `nft -f` of the same statements
        runs.sort(key=lambda r: r["full"] / r["raw"])
        r = runs[len(runs) // 2]
        results.append(r)
        spread = "" if len(runs) == 1 else \
            f"  (ratios of {len(runs)} runs: " + ", ".join(
                f"{x['full'] / x['raw']:.2f}/{x['full'] / x['plain']:.2f}" for x in runs) + ")"
        print(f"{n:>9} {r['chains']:>7} {r['rules']:>7} {r['full']:>13.3f}s {r['raw']:>11.3f}s "
              f"{r['full'] / r['raw']:>6.2f} {r['plain']:>12.3f}s {r['full'] / r['plain']:>6.2f} "
              f"{r['resync']:>7.3f}s {r['partial']:>7.3f}s {r['partial_nft']:>7.3f}s "
              f"{r['partial_kernel']:>7.3f}s "
              f"{r['rss_mb']:>5.0f}MB")
        if spread:
            print(f"{'':>9}{spread}")
        for label in ("phases", "resync_phases", "partial_phases"):
            phases = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r[label].items()))
            print(f"{'':>9} {label.replace('_', ' ')}: {phases}")
        print(f"{'':>9} partial transaction: {r['partial_statements']} statements")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"one endpoint change at {r['services']:,} vs {base['services']:,}: "
                  f"{r['partial'] / base['partial']:.2f}x over netlink, "
                  f"{r['partial_nft'] / base['partial_nft']:.2f}x through nft -f, "
                  f"{r['partial_kernel'] / base['partial_kernel']:.2f}x for the kernel's commit "
                  "alone")
    if args.latency_sizes:
        latency_part(args)


#: the datapaths the latency part measures, by name: (datapath, iptables backend)
LATENCY_DATAPATHS = {"nftables": ("nftables", "nft"), "iptables-nft": ("iptables", "nft"),
                     "iptables-legacy": ("iptables", "legacy"), "ipvs": ("ipvs", "nft")}


def latency_part(args: argparse.Namespace) -> None:
    print("new-connection latency through the last service (median connect):")
    sizes = [int(s) for s in args.latency_sizes.split(",") if s]
    names = [n for n in args.latency_datapaths.split(",") if n]
    latency: dict[str, dict[int, float]] = {name: {} for name in names}
    for n in sizes:
        for name in names:
            latency[name][n] = bench_latency(n, *LATENCY_DATAPATHS[name])
        print(f"{n:>9} services: " + ", ".join(
            f"{k} {v[n]:7.1f} us" for k, v in latency.items()))
    first, last = sizes[0], sizes[-1]
    for name in names:
        print(f"{name} latency at {last:,} vs {first:,}: "
              f"{latency[name][last] / latency[name][first]:.2f}x")
    if args.latency_json:
        Path(args.latency_json).write_text(json.dumps(latency) + "\n")
    emulated = None
    if args.ipvs_latency and Path(args.ipvs_latency).exists():
        recorded = json.loads(Path(args.ipvs_latency).read_text())
        emulated = {int(k): float(v) for k, v in recorded["ipvs"].items()}
    if args.plot and plot(latency, Path(args.plot), emulated):
        print(f"chart: {args.plot}")

if __name__ == "__main__":
    main()
