"""`svcproxy status` (the live kernel view, labelled with service names) and
`svcproxy check` (prerequisites and health, with the commands that fix them).

Service names come from the plan: computed from `--manifests` when given,
otherwise asked of the running svcproxy (GET /svcproxy/frontends on its
metrics address); without either, kernel objects are shown unlabelled.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from .config import Config
from .datapath import CheckItem
from .manager import PluginHost

FrontendIndex = dict[tuple[str, int, str], Mapping[str, Any]]


def index_frontends(frontends: Sequence[Mapping[str, Any]]) -> FrontendIndex:
    """By (address, port, protocol); NodePorts also by ("*", port, protocol), since
    a plan computed here may not know every address the node serves them on."""
    out: FrontendIndex = {}
    for f in frontends:
        out[(f["address"], int(f["port"]), f["protocol"])] = f
        if f.get("kind") == "NodePort":
            out.setdefault(("*", int(f["port"]), f["protocol"]), f)
    return out


def frontends_from_daemon(config: Config, timeout: float = 2.0
                          ) -> tuple[FrontendIndex | None, str]:
    """The running svcproxy's plan, from its metrics server; (None, why) if not there."""
    address = config.kube_proxy.metrics_bind_address
    if not address:
        return None, "metricsBindAddress is empty"
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/svcproxy/frontends"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return index_frontends(json.loads(resp.read())), url
    except (OSError, ValueError) as exc:
        return None, f"{url}: {exc}"


# ---- status rendering ------------------------------------------------------------------

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


def render_iptables(view: Mapping[str, Any]) -> str:
    lines = ["iptables (nat rules count new connections: packets = connections)",
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


def status_text(view: Mapping[str, Any], stats: bool, rate: bool, conns: bool) -> str:
    if view.get("datapath") == "ipvs":
        return render_ipvs(view, stats, rate, conns)
    return render_iptables(view)


def run_status(host: PluginHost, datapath: str, frontends: FrontendIndex, output: str,
               stats: bool, rate: bool, conns: bool, watch: float | None,
               note: str = "") -> int:
    while True:
        view = dict(host.datapath_status(datapath, frontends, conns))
        if output == "json":
            text = json.dumps(view, indent=2) + "\n"
        else:
            text = status_text(view, stats, rate, conns) + (f"({note})\n" if note else "")
        if watch is None:
            sys.stdout.write(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + f"every {watch:g}s"
                         "\n" + text)
        sys.stdout.flush()
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0


# ---- check ---------------------------------------------------------------------------

MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def run_check(host: PluginHost, config: Config, output: str) -> int:
    """Exit 1 when a problem blocks the configured mode (the first datapath svcproxy
    would use), else 0."""
    items = host.checks()
    mode = config.datapath_order()[0] if config.datapath_order() else ""
    blocking = [i for i in items if i.state == "fail" and mode in i.blocks]
    fallback = next((d for d in config.datapath_order()[1:]
                     if not any(i.state == "fail" and d in i.blocks for i in items)), None)
    if output == "json":
        sys.stdout.write(json.dumps({"mode": mode, "blocked": bool(blocking),
                                     "fallback": fallback if blocking else None,
                                     "checks": [i.to_json() for i in items]}, indent=2) + "\n")
        return 1 if blocking else 0
    width = max((len(i.name) for i in items), default=10) + 2
    for i in items:
        sys.stdout.write(f"[{MARK.get(i.state, i.state)}] {i.name:<{width}}{i.detail}\n")
        if i.fix and i.state != "ok":
            sys.stdout.write(f"       {'':<{width}}fix: {i.fix}\n")
    sys.stdout.write(_verdict(mode, blocking, fallback) + "\n")
    return 1 if blocking else 0


def _verdict(mode: str, blocking: list[CheckItem], fallback: str | None) -> str:
    if not blocking:
        return f"configured mode {mode}: ready"
    why = "; ".join(i.detail for i in blocking)
    then = (f"svcproxy would fall back to {fallback}" if fallback else
            "no fallback datapath can run either")
    return f"configured mode {mode}: BLOCKED ({why}); {then}"
