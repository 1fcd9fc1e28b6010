"""`svcproxy run --status-file PATH`: a small JSON file an operator (or a probe,
or `svcproxy status`) can read to see which datapath runs, why others were
skipped, and how the last sync went. Written atomically after every sync."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .datapath import SyncResult
from .hookspecs import hookimpl


class StatusFile:
    """An observer plugin that keeps the status file up to date."""

    def __init__(self, path: str | Path, node: str = "") -> None:
        self.path = Path(path)
        self.state: dict[str, Any] = {"node": node, "datapath": None, "fallbacks": [],
                                      "last_sync": None, "last_successful_sync": None}

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str, skipped: Sequence[tuple[str, str]]) -> None:
        self.state["datapath"] = datapath
        self.state["fallbacks"] = [{"datapath": d, "reason": r} for d, r in skipped]
        self.state["started"] = time.time()
        self.write()

    @hookimpl
    def svcproxy_observe_sync(self, result: SyncResult) -> None:
        record = {"time": result.started, "ok": result.ok, "full": result.full,
                  "duration_seconds": round(result.duration, 6), "error": result.error,
                  "frontends": result.frontends, "backends": result.backends,
                  "created": result.created, "updated": result.updated,
                  "deleted": result.deleted}
        self.state["last_sync"] = record
        if result.ok:
            self.state["last_successful_sync"] = record
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".status-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, self.path)
