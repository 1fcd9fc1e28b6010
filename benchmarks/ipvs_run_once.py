"""The whole command against the raw tool, inside the virtme-ng VM (issue #16):
`svcproxy run --once --manifests DIR` (a process: start-up, reading the JSON
List, planning, the IPVS sync with its helpers) against `ipvsadm -R` of the
same virtual and real servers, each in a fresh network namespace, at each
size. Start-up is taken out by the difference between two sizes:
(svcproxy(large) - svcproxy(small)) / (ipvsadm(large) - ipvsadm(small)).

    benchmarks/run-in-vm.sh benchmarks/ipvs_run_once.py [--sizes 1000,10000]

Software emulation makes absolute times slow; the ratios are the point.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from factories import endpoint, node, service, slice_  # noqa: E402
from ipvs_sync import HTTP, ip, ipvsadm_rules, netns  # noqa: E402
from manifest_scale import write  # noqa: E402

#: --profile's directory
PROFILE: str | None = None
#: runs argv[1:] as its child and reports its wall time and peak RSS
LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nLAUNCHED {time.perf_counter() - t0} {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cluster(n: int) -> list[dict[str, object]]:
    """ipvs_sync.py's cluster (the same virtual and real servers as its
    ipvsadm input) as API objects."""
    objs: list[dict[str, object]] = [node("node-a", ips=["192.168.100.1"])]
    for i in range(n):
        objs.append(service(f"svc-{i:05d}", "bench", cluster_ip=ip(i, 96), ports=HTTP))
        objs.append(slice_(f"svc-{i:05d}", "bench",
                           endpoints=[endpoint(ip(i * 5 + j, 128)) for j in range(5)],
                           ports=[{"name": "http", "port": 8080}]))
    return objs


def run_once(n: int, work: Path) -> tuple[float, float]:
    """(seconds, peak RSS MB) of the svcproxy process."""
    ns = f"once-{n}"
    netns(ns)
    try:
        (work / "manifests").mkdir()
        write(work / "manifests", cluster(n), "json")
        (work / "config.yaml").write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: ipvs
            clusterCIDR: 10.128.0.0/9
            metricsBindAddress: ""
            healthzBindAddress: ""
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            datapaths: [ipvs]
            datapathOptions:
              ipvs: {{netns: {ns}, sysctlBackup: {work / 'sysctl.json'}}}
        """))
        svcproxy = [str(Path(sys.executable).parent / "svcproxy")]
        if PROFILE:
            svcproxy = [sys.executable, "-m", "cProfile", "-o",
                        str(Path(PROFILE) / f"run-once-{n}.prof"), "-m", "svcproxy.cli"]
        # started by a small launcher, not from this process: a child's peak
        # RSS (ru_maxrss) counts the image it had before exec, and this
        # process, which built the cluster, is larger than svcproxy at 1,000
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *svcproxy, "run", "--once",
                               "--manifests", str(work / "manifests"),
                               "--config", str(work / "config.yaml"),
                               "--node", "node-a", "--status-socket", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"svcproxy run --once failed at {n}:\n{proc.stderr[-3000:]}")
        seconds, maxrss_kb = proc.stderr.strip().splitlines()[-1].split()[1:3]
        return float(seconds), int(maxrss_kb) / 1024
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def restore(n: int) -> float:
    ns = f"raw-{n}"
    netns(ns)
    try:
        rules = ipvsadm_rules(n)
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-R"], input=rules, text=True,
                       check=True)
        return time.perf_counter() - t0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--repeat", type=int, default=1, help="rounds (each measures every size)")
    p.add_argument("--profile", metavar="DIR",
                   help="run svcproxy under cProfile, writing DIR/run-once-N.prof (times "
                   "are then not comparable)")
    args = p.parse_args()
    global PROFILE
    PROFILE = args.profile
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print("svcproxy run --once --manifests vs ipvsadm -R (inside the VM, software emulation)")
    print(f"{'services':>9} {'run --once':>11} {'peak RSS':>9} {'ipvsadm -R':>11} {'ratio':>6}")
    # the emulated VM's speed drifts by up to 2x between minutes (one run
    # measured 0.76x, the next 1.81x): each round measures every size with
    # both, and the ratio is taken per round
    rounds: list[dict[int, tuple[float, float, float]]] = []
    for _ in range(args.repeat):
        rows: dict[int, tuple[float, float, float]] = {}
        for n in sizes:
            work = Path(tempfile.mkdtemp(prefix=f"svp-once-{n}-"))
            try:
                ours, rss = run_once(n, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            raw = restore(n)
            rows[n] = (ours, raw, rss)
            print(f"{n:>9} {ours:>10.2f}s {rss:>7.0f}MB {raw:>10.2f}s {ours / raw:>6.2f}",
                  flush=True)
        rounds.append(rows)
        if len(rows) >= 2:
            small, large = min(rows), max(rows)
            d_ours = rows[large][0] - rows[small][0]
            d_raw = rows[large][1] - rows[small][1]
            print(f"{small} -> {large} services: svcproxy +{d_ours:.2f}s, ipvsadm -R "
                  f"+{d_raw:.2f}s: {d_ours / d_raw:.2f}x (start-up taken out)", flush=True)
    if len(rounds) > 1 and len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        ratios = sorted((r[large][0] - r[small][0]) / (r[large][1] - r[small][1])
                        for r in rounds)
        print(f"ratios of {len(rounds)} rounds: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; median {ratios[len(ratios) // 2]:.2f}x; peak RSS at {large}: "
              + ", ".join(f"{r[large][2]:.0f}" for r in rounds) + " MB")


if __name__ == "__main__":
    main()
