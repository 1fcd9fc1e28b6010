"""Should svcproxy use python-iptables? (root; runs in scratch network namespaces)

python-iptables (iptc) drives libiptc in-process, so it only sees the legacy
backend. The one job it could do better than the tools is reading rule
counters there (`svcproxy status` with the iptables datapath on a legacy
host). For N services x 5 endpoints in kube-proxy's layout, loaded into the
legacy backend of a fresh namespace, this times:

  save -c    `iptables-legacy-save -c -t nat` run as svcproxy runs it (ip netns
             exec) and parsed by svcproxy's status parser (comments, targets,
             destinations and counters of every rule): what `svcproxy status` does
  iptc       python-iptables reading every nat rule's counters in-process
  nft        whether iptc sees the rules when they are in the nft backend

    .venv/bin/pip install -e '.[bench]'   # python-iptables is not a dependency
    python benchmarks/python_iptables.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

from factories import endpoint, plan_of, service, slice_  # noqa: E402
from netns import Topology, in_namespace, sh  # noqa: E402

from svcproxy.plugins.iptables.datapath import render_iptables_save  # noqa: E402
from svcproxy.plugins.iptables.rules import RuleOptions  # noqa: E402
from svcproxy.plugins.iptables.status import _parse as parse_counters  # noqa: E402

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def ruleset(n: int) -> str:
    objs = []
    for i in range(n):
        objs.append(service(f"s{i}", cluster_ip=f"10.{96 + i // 65536}.{i // 256 % 256}."
                            f"{i % 256}", ports=HTTP))
        objs.append(slice_(f"s{i}", endpoints=[endpoint(f"10.{200 + j}.{i // 256 % 256}."
                                                        f"{i % 256}") for j in range(5)]))
    plan = plan_of(objs).for_family(4)
    text = render_iptables_save(plan, RuleOptions())
    # only svcproxy's own chains (no jumps from built-in chains, no comments)
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"


def iptc_counters(table_name: str) -> tuple[int, int]:
    import iptc

    table = iptc.Table(table_name)
    table.refresh()
    rules = packets = 0
    for chain in table.chains:
        for rule in chain.rules:
            pkts, _ = rule.get_counters()
            rules += 1
            packets += pkts
    return rules, packets


def measure(n: int, repeat: int) -> dict[str, float | int]:
    topo = Topology(prefix=f"svppi{n}")
    try:
        topo.create_node()
        sh("iptables-legacy-restore", "--noflush", netns=topo.node, stdin=ruleset(n),
           timeout=1800)
        save_times, iptc_times = [], []
        rules_save = rules_iptc = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            text = sh("iptables-legacy-save", "-c", "-t", "nat", netns=topo.node).stdout
            rules_save = sum(len(r) for r in parse_counters(text).values())
            save_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rules_iptc, _ = in_namespace(topo.node, lambda: iptc_counters("nat"))
            iptc_times.append(time.perf_counter() - t0)
    finally:
        topo.close()
    nft = Topology(prefix=f"svppn{n}")
    try:
        nft.create_node()
        sh("iptables-nft-restore", "--noflush", netns=nft.node, stdin=ruleset(min(n, 100)))
        seen_nft, _ = in_namespace(nft.node, lambda: iptc_counters("nat"))
    finally:
        nft.close()
    return {"services": n, "rules": rules_save, "rules_iptc": rules_iptc,
            "save": statistics.median(save_times), "iptc": statistics.median(iptc_times),
            "iptc_sees_nft_rules": seen_nft}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'services':>9} {'nat rules':>10} {'save -c + parse':>16} {'iptc':>9} "
          f"{'iptc / save':>12} {'iptc sees nft rules':>20}")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, args.repeat)
        assert r["rules"] == r["rules_iptc"], r
        print(f"{r['services']:>9,} {r['rules']:>10,} {r['save']:>15.3f}s {r['iptc']:>8.3f}s "
              f"{r['iptc'] / r['save']:>11.2f}x {r['iptc_sees_nft_rules']:>20}", flush=True)


if __name__ == "__main__":
    main()
