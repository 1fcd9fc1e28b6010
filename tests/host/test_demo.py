"""`svcproxy demo` runs to completion on this host (IPVS where the kernel has
it, else the nftables fallback) and leaves no namespace, link, chain, ipset or
file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from netns import ipvs_available

SVCPROXY = str(Path(sys.executable).parent / "svcproxy")


def host_state() -> dict[str, str]:
    def out(*args: str) -> str:
        return subprocess.run(args, capture_output=True, text=True, check=False).stdout

    saves = "".join(out(t) for t in ("iptables-nft-save", "iptables-legacy-save",
                                     "ip6tables-nft-save"))
    return {
        "netns": out("ip", "netns", "list"),
        "links": out("ip", "-o", "link", "show"),
        "rules": "\n".join(line for line in saves.splitlines()
                           if not line.startswith(("#", ":"))),
        "ipsets": out("ipset", "list", "-n"),
        "nftables": out("nft", "list", "tables"),
        "conntrack": out("sysctl", "net.netfilter.nf_conntrack_tcp_timeout_established",
                         "net.netfilter.nf_conntrack_tcp_timeout_close_wait"),
        "backup": str(os.path.exists("/var/lib/svcproxy/sysctl-backup.json")),
    }


def test_demo_runs_and_cleans_up() -> None:
    before = host_state()
    # 40 per frontend: every one of web's three pods answers but for a chance of
    # 3 x (2/3)^40 ~ 3e-7 (with 12 it was ~2 %)
    proc = subprocess.run([SVCPROXY, "demo", "--requests", "40"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    if ipvs_available():
        assert "datapath: ipvs (the primary one)" in out
        assert "unusable here" not in out
    else:
        assert "datapath ipvs: unusable here (the ip_vs kernel module is not loaded" in out
        assert "datapath: nftables (the fallback)" in out
    # every kind of frontend answered, from the right pods
    web = next(line for line in out.splitlines() if "10.96.10.10:80" in line)
    assert "web-1" in web and "web-2" in web and "web-3" in web
    assert sum(int(w) for w in web.split()[5::2]) == 40
    np_ = next(line for line in out.splitlines() if "192.168.50.11:30080" in line)
    assert "storefront-" in np_ and "NodePort" in np_
    lb = next(line for line in out.splitlines() if "203.0.113.10:443" in line)
    assert "ingress-" in lb and "LoadBalancer" in lb
    dns = next(line for line in out.splitlines() if "kube-dns:dns " in line)
    assert "kube-dns-" in dns  # UDP
    cart = next(line for line in out.splitlines() if "10.96.30.30:80" in line)
    assert cart.count("cart-") == 1  # ClientIP affinity: one pod
    assert "(no error)" in out and "BROKEN" not in out
    assert "cleaned up: 23 network namespaces removed" in out
    assert "Traceback" not in proc.stderr
    assert host_state() == before
