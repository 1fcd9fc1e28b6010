"""`svcproxy status` (the live kernel view, labelled with service names) and
`svcproxy check` (prerequisites and health, with the commands that fix them).

Service names come from the plan: computed from `--manifests` when given,
otherwise asked of the running svcproxy (GET /svcproxy/frontends on its
status socket, core/status.py); without either, kernel objects are shown
unlabelled.
"""

from __future__ import annotations

import json
import sys
import time
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


def frontends_from_daemon(socket_path: str, timeout: float = 2.0
                          ) -> tuple[FrontendIndex | None, str]:
    """The running svcproxy's plan, from its status socket; (None, why) if not there."""
    from .status import ask_socket

    if not socket_path:
        return None, "no status socket given"
    try:
        return index_frontends(ask_socket(socket_path, "/svcproxy/frontends", timeout)), \
            socket_path
    except (OSError, ValueError) as exc:
        return None, f"{socket_path}: {exc}"


def status_text(host: PluginHost, view: Mapping[str, Any], stats: bool, rate: bool,
                conns: bool) -> str:
    """The datapath renders its own view; one that does not gets it as JSON."""
    text = host.render_status(str(view.get("datapath", "")), view, stats, rate, conns)
    return text if text is not None else json.dumps(view, indent=2, default=str) + "\n"


def run_status(host: PluginHost, datapath: str, frontends: FrontendIndex, output: str,
               stats: bool, rate: bool, conns: bool, watch: float | None,
               note: str = "") -> int:
    while True:
        view = dict(host.datapath_status(datapath, frontends, conns))
        if output == "json":
            text = json.dumps(view, indent=2) + "\n"
        else:
            text = status_text(host, view, stats, rate, conns) + (f"({note})\n" if note else "")
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
