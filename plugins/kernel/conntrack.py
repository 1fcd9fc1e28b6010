"""Connection tracking: deleting entries (stale UDP flows after an endpoint
goes) with the conntrack tool, and the table's usage for metrics and checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from svcproxy.datapath import MetricSample

from .netns import read_proc
from .tools import run_tool


def conntrack_delete(args: Sequence[str], family: int = 4, netns: str | None = None) -> int:
    """Delete matching conntrack entries; returns how many were deleted."""
    fam = ["-f", "ipv6"] if family == 6 else []
    proc = run_tool(["conntrack", "-D", *fam, *args], netns, check=False)
    m = re.search(r"(\d+) flow entries have been deleted", proc.stderr)
    return int(m.group(1)) if m else 0


def conntrack_samples(netns: str | None = None) -> list[MetricSample]:
    """Connection-tracking table usage: entries and the table's limit."""
    out = []
    for name, what in (("nf_conntrack_count", "svcproxy_conntrack_entries"),
                       ("nf_conntrack_max", "svcproxy_conntrack_max")):
        text = read_proc(f"/proc/sys/net/netfilter/{name}", netns)
        if text and text.strip().isdigit():
            out.append(MetricSample(what, "Connection tracking table " + (
                "entries" if name.endswith("count") else "limit (nf_conntrack_max)"),
                float(text.strip())))
    return out


class Conntrack:
    """The conntrack door of one network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def delete(self, args: Sequence[str], family: int = 4) -> int:
        """Delete the entries matching conntrack filter `args`; how many went."""
        return conntrack_delete(args, family, self.netns)
