"""The IPVS kernel view for `svcproxy status`, and the IPVS checks of
`svcproxy check`."""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Mapping
from typing import Any

from svcproxy.datapath import CheckItem
from svcproxy.plugins.kernel.ipvs import F_PERSISTENT, F_SCHED1, F_SCHED2, IPVSNetlink
from svcproxy.plugins.kernel.netns import read_proc
from svcproxy.plugins.kernel.tools import run_tool

FWD = {0: "Masq", 1: "Local", 2: "Tunnel", 3: "Route", 4: "Bypass"}


def _conn_address(text: str) -> str:
    # /proc/net/ip_vs_conn: IPv4 as 8 hex digits, IPv6 in its text form
    if ":" in text:
        return str(ipaddress.ip_address(text))
    return str(ipaddress.IPv4Address(int(text, 16)))


def connections(netns: str | None) -> list[dict[str, Any]]:
    """The IPVS connection table (/proc/net/ip_vs_conn)."""
    text = read_proc("/proc/thread-self/net/ip_vs_conn", netns) or ""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        try:
            out.append({"protocol": f[0], "client": _conn_address(f[1]),
                        "client_port": int(f[2], 16), "virtual": _conn_address(f[3]),
                        "virtual_port": int(f[4], 16), "backend": _conn_address(f[5]),
                        "backend_port": int(f[6], 16), "state": f[7],
                        "expires": int(f[8])})
        except ValueError:
            continue
    return out


def flags_text(scheduler: str, flags: int, timeout: int) -> str:
    names = []
    prefix = scheduler if scheduler in ("sh", "mh") else ""
    if flags & F_SCHED1:
        names.append(f"{prefix}-fallback" if prefix else "flag-1")
    if flags & F_SCHED2:
        names.append(f"{prefix}-port" if prefix else "flag-2")
    if flags & F_PERSISTENT:
        names.append(f"persistent {timeout}")
    return " ".join(names)


def ipvs_status(nl: IPVSNetlink, netns: str | None,
                frontends: Mapping[tuple[str, int, str], Mapping[str, Any]],
                with_connections: bool) -> dict[str, Any]:
    conns_by_vs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    if with_connections:
        for c in connections(netns):
            conns_by_vs.setdefault((c["virtual"], c["virtual_port"], c["protocol"]),
                                   []).append(c)
    rows = []
    for vs, stats, dests in sorted(nl.stats(), key=lambda t: (":" in t[0].address,
                                                               t[0].protocol, t[0].address,
                                                               t[0].port)):
        fe = frontends.get(vs.key) or frontends.get(("*", vs.port, vs.protocol))
        planned: set[tuple[str, int]] = set()
        if fe is not None:
            backends = fe.get("backends") or []
            if not backends and fe.get("traffic_policy") == "Local":
                backends = fe.get("cluster_backends") or []
            planned = {(b["address"], b["port"]) for b in backends}
        real = []
        for rs, rstats in sorted(dests, key=lambda d: d[0]):
            if fe is None:
                state = ""
            elif rs.key in planned:
                state = "ok"
            else:
                # in the kernel but not in the plan: a removed endpoint draining
                state = "draining" if rs.weight == 0 else "stale"
            real.append({"address": rs.address, "port": rs.port,
                         "forward": FWD.get(rs.fwd_method, str(rs.fwd_method)),
                         "weight": rs.weight, "active": rs.active, "inactive": rs.inactive,
                         "persistent": rs.persistent, "state": state, "stats": rstats})
        row = {"protocol": vs.protocol, "address": vs.address, "port": vs.port,
               "scheduler": vs.scheduler,
               "flags": flags_text(vs.scheduler, vs.flags, vs.timeout),
               "service": fe.get("service") if fe else None,
               "kind": fe.get("kind") if fe else None,
               "stats": stats, "backends": real}
        if with_connections:
            row["connections"] = conns_by_vs.get(vs.key, [])
        rows.append(row)
    return {"datapath": "ipvs", "frontends": rows}


def _sysctl(name: str, netns: str | None) -> str | None:
    text = read_proc(f"/proc/sys/{name}", netns)
    return text.strip() if text is not None else None


def ipvs_checks(scheduler: str, probe_reason: str | None, netns: str | None,
                needed: Mapping[str, str]) -> list[CheckItem]:
    items = []
    if probe_reason is None:
        items.append(CheckItem("ipvs", "ok", f"IPVS works here (scheduler {scheduler})"))
    else:
        if "scheduler" in probe_reason:
            fix = f"modprobe ip_vs_{scheduler}"
        elif "module" in probe_reason or "netlink" in probe_reason.lower():
            fix = ("modprobe ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh nf_conntrack (install the "
                   "kernel's modules package if they are missing)")
        else:
            fix = ""
        items.append(CheckItem("ipvs", "fail", probe_reason, fix, blocks=("ipvs",)))
    if shutil.which("ipset") is None:
        items.append(CheckItem("ipset", "fail", "ipset not found", "apt-get install ipset",
                               blocks=("ipvs",)))
    else:
        proc = run_tool(["ipset", "version"], check=False, timeout=30)
        items.append(CheckItem("ipset", "ok" if proc.returncode == 0 else "warn",
                               (proc.stdout or proc.stderr).strip().splitlines()[0]
                               if (proc.stdout or proc.stderr).strip() else "ipset"))
    if shutil.which("ipvsadm") is None:
        items.append(CheckItem("ipvsadm", "warn", "ipvsadm not found (svcproxy does not need "
                               "it; `svcproxy status` shows the same and more)",
                               "apt-get install ipvsadm"))
    if probe_reason is None:
        for name, value in needed.items():
            current = _sysctl(name, netns)
            dotted = name.replace("/", ".")
            if current is None:
                continue
            state = "ok" if current == value else "warn"
            items.append(CheckItem(f"sysctl {dotted}", state,
                                   f"{current} (svcproxy sets {value} when it runs)",
                                   "" if state == "ok" else f"sysctl -w {dotted}={value}"))
        bits = read_proc("/sys/module/ip_vs/parameters/conn_tab_bits")
        conns = read_proc("/proc/thread-self/net/ip_vs_conn", netns)
        if bits is not None and conns is not None:
            size = 1 << int(bits.strip())
            n = max(0, conns.count("\n") - 1)
            items.append(CheckItem("ipvs connections", "ok",
                                   f"{n} entries (hash table of {size} buckets)"))
    if os.geteuid() != 0:
        items.append(CheckItem("privileges", "warn", "not running as root: some checks "
                               "could not read the kernel", "sudo svcproxy check"))
    return items


def _hp(address: str, port: Any) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_ipvs(view: Mapping[str, Any], stats: bool, rate: bool, conns: bool) -> str:
    lines = ["IP Virtual Server (svcproxy view: services from the plan, draining marked)"]
    if stats:
        lines.append(f"{'Prot LocalAddress:Port':<33} {'Conns':>8} {'InPkts':>9} "
                     f"{'OutPkts':>9} {'InBytes':>10} {'OutBytes':>10}  Service")
        lines.append(f"{'  -> RemoteAddress:Port':<33}")
    elif rate:
        lines.append(f"{'Prot LocalAddress:Port':<33} {'CPS':>8} {'InPPS':>9} {'OutPPS':>9} "
                     f"{'InBPS':>10} {'OutBPS':>10}  Service")
        lines.append(f"{'  -> RemoteAddress:Port':<33}")
    else:
        lines.append("Prot LocalAddress:Port Scheduler Flags            Service")
        lines.append("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn")
    for fe in view["frontends"]:
        label = fe["service"] or "(not svcproxy's, or names unknown)"
        if fe.get("kind"):
            label += f" ({fe['kind']})"
        head = f"{fe['protocol']:<4} {_hp(fe['address'], fe['port'])}"
        if stats or rate:
            keys = (("conns", "inpkts", "outpkts", "inbytes", "outbytes") if stats else
                    ("cps", "inpps", "outpps", "inbps", "outbps"))
            s = fe["stats"]
            lines.append(f"{head:<33} {s[keys[0]]:>8} {s[keys[1]]:>9} {s[keys[2]]:>9} "
                         f"{s[keys[3]]:>10} {s[keys[4]]:>10}  {label}")
        else:
            sched = f"{fe['scheduler']} {fe['flags']}".strip()
            lines.append(f"{head} {sched:<27}{label}" if len(head) < 22 else
                         f"{head} {sched}  {label}")
        for b in fe["backends"]:
            mark = "" if b["state"] in ("ok", "") else f"  {b['state']}"
            rh = f"  -> {_hp(b['address'], b['port'])}"
            if stats or rate:
                s = b["stats"]
                lines.append(f"{rh:<33} {s[keys[0]]:>8} {s[keys[1]]:>9} {s[keys[2]]:>9} "
                             f"{s[keys[3]]:>10} {s[keys[4]]:>10}{mark}")
            else:
                lines.append(f"{rh:<33} {b['forward']:<7} {b['weight']:<6} {b['active']:<10} "
                             f"{b['inactive']:<9}{mark}")
        if conns:
            for c in fe.get("connections", []):
                lines.append(f"       {c['protocol']} {_hp(c['client'], c['client_port'])} -> "
                             f"{_hp(c['backend'], c['backend_port'])} {c['state']} "
                             f"expires {c['expires']}s")
    return "\n".join(lines) + "\n"
