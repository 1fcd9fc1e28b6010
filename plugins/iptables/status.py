"""The iptables kernel view for `svcproxy status` (per-service counters from
`iptables-save -c`) and the iptables checks of `svcproxy check`.

nat rules see only the first packet of each connection, so the counters of the
service and endpoint rules count new connections (packets) and their first
packets' bytes — which is what says where connections went."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Mapping
from typing import Any

from svcproxy.datapath import CheckItem
from svcproxy.plugins.kernel.iptables import IptablesKernel
from svcproxy.plugins.kernel.netns import read_proc
from svcproxy.plugins.kernel.tools import KernelError

_LINE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_SUFFIXES = (" cluster IP", " external IP", " loadbalancer IP", " nodePort",
             " has no endpoints", " has no local endpoints")
_JUMP_PREFIXES = ("KUBE-SVC-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SVL-")


def _parse(text: str) -> dict[str, list[dict[str, Any]]]:
    chains: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        packets, octets, chain, rest = int(m[1]), int(m[2]), m[3], m[4]
        try:
            words = shlex.split(rest)
        except ValueError:
            continue
        rule: dict[str, Any] = {"packets": packets, "bytes": octets}
        for i, w in enumerate(words[:-1]):
            nxt = words[i + 1]
            if w == "--comment":
                rule["comment"] = nxt
            elif w == "-j":
                rule["target"] = nxt
            elif w == "-d":
                rule["dst"] = nxt.removesuffix("/32").removesuffix("/128")
            elif w == "--dport":
                rule["port"] = int(nxt)
            elif w == "-p":
                rule["protocol"] = nxt.upper()
            elif w == "--to-destination":
                rule["to"] = nxt
        chains.setdefault(chain, []).append(rule)
    return chains


def _endpoints(chains: dict[str, list[dict[str, Any]]], chain: str,
               seen: set[str]) -> list[dict[str, Any]]:
    """Endpoint rules reachable from a service chain (KUBE-EXT -> KUBE-SVC -> SEP)."""
    if chain in seen:
        return []
    seen.add(chain)
    out = []
    for r in chains.get(chain, []):
        target = r.get("target", "")
        if target.startswith("KUBE-SEP-"):
            ep = r.get("comment", "").partition(" -> ")[2]
            out.append({"endpoint": ep, "packets": r["packets"], "bytes": r["bytes"]})
        elif target.startswith(_JUMP_PREFIXES):
            out += _endpoints(chains, target, seen)
    return out


def iptables_status(kernels: list[IptablesKernel]) -> dict[str, Any]:
    rows = []
    for kernel in kernels:
        text = kernel.run([kernel.tool("save"), "-c", "-t", "nat"]).stdout
        chains = _parse(text)
        for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
            for r in chains.get(chain, []):
                target = r.get("target", "")
                if not target.startswith(_JUMP_PREFIXES) or "comment" not in r:
                    continue
                service = r["comment"]
                kind = ""
                for suffix in _SUFFIXES:
                    if service.endswith(suffix):
                        service, kind = service[: -len(suffix)], suffix.strip()
                        break
                rows.append({"family": kernel.family, "chain": chain,
                             "address": r.get("dst", "*"), "port": r.get("port"),
                             "protocol": r.get("protocol", ""), "service": service,
                             "kind": kind, "packets": r["packets"], "bytes": r["bytes"],
                             "backends": _endpoints(chains, target, set())})
    return {"datapath": "iptables", "frontends": rows}


def iptables_checks(kernel: IptablesKernel, why_backend: str,
                    netns: str | None) -> list[CheckItem]:
    items = []
    reason = kernel.available()
    if reason is None:
        version = kernel.run([kernel.tool(""), "--version"], check=False).stdout.strip()
        items.append(CheckItem(f"iptables (IPv{kernel.family})", "ok",
                               f"{version or kernel.tool('')} ({why_backend})"))
    else:
        items.append(CheckItem(f"iptables (IPv{kernel.family})",
                               "fail" if kernel.family == 4 else "warn", reason,
                               "apt-get install iptables",
                               blocks=("iptables", "ipvs") if kernel.family == 4 else ()))
    return items


def conntrack_checks(netns: str | None) -> list[CheckItem]:
    items = []
    count = read_proc("/proc/sys/net/netfilter/nf_conntrack_count", netns)
    limit = read_proc("/proc/sys/net/netfilter/nf_conntrack_max", netns)
    if count is None or limit is None:
        items.append(CheckItem("conntrack table", "warn", "nf_conntrack is not loaded "
                               "(it loads with the first NAT rule)", "modprobe nf_conntrack"))
    else:
        n, m = int(count), int(limit)
        used = n / m if m else 0.0
        state = "warn" if used > 0.9 else "ok"
        items.append(CheckItem("conntrack table", state,
                               f"{n} of {m} entries ({used:.0%})",
                               "" if state == "ok" else
                               "raise conntrack.maxPerCore / conntrack.min in the config, or "
                               f"sysctl -w net.netfilter.nf_conntrack_max={m * 2}"))
    if shutil.which("conntrack") is None:
        items.append(CheckItem("conntrack tool", "warn", "conntrack not found: stale UDP "
                               "entries cannot be flushed when endpoints go away",
                               "apt-get install conntrack"))
    return items


def safe_checks(kernel: IptablesKernel, why: str, netns: str | None) -> list[CheckItem]:
    try:
        return iptables_checks(kernel, why, netns)
    except KernelError as exc:
        return [CheckItem(f"iptables (IPv{kernel.family})", "fail", str(exc),
                          "apt-get install iptables", blocks=("iptables", "ipvs"))]


def _hp(address: str, port: Any) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_iptables(view: Mapping[str, Any]) -> str:
    return render_counts(view, "iptables (nat rules count new connections: packets = "
                               "connections)")


def render_counts(view: Mapping[str, Any], title: str) -> str:
    """The netfilter datapaths' `svcproxy status` table: new connections per
    frontend and per endpoint, from NAT rule counters."""
    lines = [title,
             f"{'Prot Destination':<34} {'Conns':>8} {'Bytes':>10}  Service",
             "  -> Endpoint"]
    for fe in view["frontends"]:
        port = fe["port"] if fe["port"] is not None else "*"
        head = f"{fe['protocol'] or '*':<4} {_hp(fe['address'], port)}"
        label = fe["service"] + (f" ({fe['kind']})" if fe["kind"] else "")
        lines.append(f"{head:<34} {fe['packets']:>8} {fe['bytes']:>10}  {label}")
        for b in fe["backends"]:
            lines.append(f"{'  -> ' + b['endpoint']:<34} {b['packets']:>8} {b['bytes']:>10}")
    return "\n".join(lines) + "\n"

