"""The whole `svcproxy plan --manifests DIR -o json` command at scale, as a user
runs it: N Services x 5 endpoints written as one JSON List (the shape of
`kubectl get -o json`) and as multi-document YAML, the command run as a
process, its wall time and peak RSS measured (no root needed).

    python benchmarks/manifest_scale.py [--services 10000 50000] [--format json yaml]

Prints one row per (services, format); results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from factories import endpoint, node, service, slice_  # noqa: E402


def cluster(n: int) -> list[dict[str, object]]:
    objs: list[dict[str, object]] = [node("node-a", ips=["192.168.100.1"])]
    for i in range(n):
        objs.append(service(f"svc-{i}", cluster_ip=f"10.{96 + i // 65000}.{i // 250 % 260}."
                            f"{i % 250 + 1}"))
        objs.append(slice_(f"svc-{i}", endpoints=[
            endpoint(f"10.{100 + i // 250 % 150}.{i % 250}.{10 + k}", f"node-{k}")
            for k in range(5)]))
    return objs


def write(directory: Path, objs: list[dict[str, object]], fmt: str) -> int:
    if fmt == "json":
        path = directory / "cluster.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    else:
        path = directory / "cluster.yaml"
        path.write_text(yaml.dump_all(objs, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                      sort_keys=False))
    return path.stat().st_size


def run_plan(directory: Path, out: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS MB of the command, frontends printed)."""
    svcproxy = str(Path(sys.executable).parent / "svcproxy")
    start = time.perf_counter()
    with open(out, "w") as stdout:
        proc = subprocess.Popen([svcproxy, "plan", "--manifests", str(directory), "--node",
                                 "node-a", "-o", "json"], stdout=stdout,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read().decode() if proc.stderr else "plan failed")
    return seconds, usage.ru_maxrss / 1024, len(json.loads(out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--format", nargs="+", default=["json", "yaml"], choices=["json", "yaml"])
    args = ap.parse_args()
    print(f"{'services':>9} {'format':>6} {'file MB':>8} {'seconds':>8} {'peak RSS MB':>12} "
          f"{'frontends':>9}")
    for n in sorted(args.services):
        objs = cluster(n)
        for fmt in args.format:
            with tempfile.TemporaryDirectory(prefix="svcproxy-scale-") as tmp:
                (Path(tmp) / "in").mkdir()
                size = write(Path(tmp) / "in", objs, fmt)
                seconds, rss, frontends = run_plan(Path(tmp) / "in", Path(tmp) / "plan.json")
            print(f"{n:>9} {fmt:>6} {size / 1e6:8.1f} {seconds:8.2f} {rss:12.0f} "
                  f"{frontends:>9}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
