"""Memory of a running proxy (issue #16, item 2): the resident size of
`svcproxy run --once` right after its first sync, and the process's peak, for
N Services x 5 endpoints (plus default/kubernetes and kube-dns), each datapath
in a network namespace this benchmark creates, from a manifest directory (one
JSON List) and from tests/apiserver.py (the real list/watch protocol, lists
in pages). The svcproxy process runs the real CLI; a few lines around
Proxy.sync print VmRSS and VmHWM after the sync. Root.

    sudo python benchmarks/memory.py [--services 1000 10000 50000]
        [--datapaths iptables nftables]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from apiserver import FakeAPIServer  # noqa: E402
from cold_start import objects  # noqa: E402
from factories import node  # noqa: E402
from manifest_scale import write  # noqa: E402

WRAPPER = textwrap.dedent("""\
    import sys
    import svcproxy.proxy as P
    orig = P.Proxy.sync
    def sync(self, full=False):
        r = orig(self, full)
        st = open("/proc/self/status").read()
        kb = {k: int(st.split(k + ":")[1].split()[0]) for k in ("VmRSS", "VmHWM")}
        print(f"MEMORY ok={r.ok} rss_kb={kb['VmRSS']} peak_kb={kb['VmHWM']}", file=sys.stderr)
        return r
    P.Proxy.sync = sync
    from svcproxy.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def measure(work: Path, datapath: str, source: list[str]) -> tuple[float, float]:
    ns = f"svpmem{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        cfg = work / f"{datapath}.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            apiVersion: kubeproxy.config.k8s.io/v1alpha1
            kind: KubeProxyConfiguration
            mode: {datapath}
            metricsBindAddress: ""
            healthzBindAddress: ""
            ---
            apiVersion: svcproxy.io/v1alpha1
            kind: SvcProxyConfiguration
            disable: [conntrack]
            datapaths: [{datapath}]
            datapathOptions:
              iptables: {{netns: {ns}, backend: legacy}}
              nftables: {{netns: {ns}}}
        """))
        out = subprocess.run([sys.executable, "-c", WRAPPER, "run", "--once", *source,
                              "--config", str(cfg), "--node", "node-a", "--status-socket", ""],
                             capture_output=True, text=True, timeout=1800)
        found = re.search(r"MEMORY ok=True rss_kb=(\d+) peak_kb=(\d+)", out.stderr)
        if not found:
            raise SystemExit(f"no successful sync ({datapath}):\n{out.stderr[-3000:]}")
        return int(found[1]) / 1024, int(found[2]) / 1024
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--datapaths", nargs="+", default=["iptables", "nftables"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("memory.py needs root (network namespaces)", file=sys.stderr)
        return 2
    print(f"{'services':>9} {'source':<10} {'datapath':<10} {'RSS MB':>7} {'peak MB':>8}")
    for n in args.services:
        work = Path(tempfile.mkdtemp(prefix="svp-mem-"))
        server = FakeAPIServer()
        try:
            objs = [node("node-a", ips=["192.168.100.1"]), *objects(n)]
            (work / "manifests").mkdir()
            write(work / "manifests", objs, "json")
            for obj in objs:
                server.apply(obj)
            kubeconfig = str(server.kubeconfig(work / "kubeconfig"))
            for datapath in args.datapaths:
                for name, source in (("manifests", ["--manifests", str(work / "manifests")]),
                                     ("API", ["--kubeconfig", kubeconfig])):
                    rss, peak = measure(work, datapath, source)
                    print(f"{n:>9} {name:<10} {datapath:<10} {rss:>7.0f} {peak:>8.0f}",
                          flush=True)
        finally:
            server.close()
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
