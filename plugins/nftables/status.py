"""The nftables kernel view for `svcproxy status` (per-endpoint counters of the
DNAT rules, joined to the frontends of the dispatch maps), the checks of
`svcproxy check`, and the recording door of `svcproxy plan --against-kernel`.

NAT chains see only the first packet of a connection, so an endpoint rule's
counter counts the new connections sent there (over every frontend of its
service port)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from svcproxy.datapath import CheckItem
from svcproxy.plugins.iptables.status import conntrack_checks, render_counts
from svcproxy.plugins.kernel.nftables import (
    MIN_KERNEL,
    MIN_NFT,
    NftKernel,
    NftSet,
    NftTable,
    kernel_version,
    nft_version,
)
from svcproxy.plugins.kernel.tools import KernelError

from .rules import CLUSTER_IPS, SERVICE_IPS, SERVICE_NODEPORTS, is_service_chain

_COUNTER = re.compile(r"counter packets (\d+) bytes (\d+) dnat to (\S+)")
_TARGET = re.compile(r"(?:goto|jump) (\S+)")


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def kernel_requirement() -> str:
    """Why this kernel is too old for the layout ("" if it is not)."""
    have = kernel_version()
    if have and have < MIN_KERNEL:
        return (f"kernel {_v(have)} is older than {_v(MIN_KERNEL)}, which svcproxy's "
                "nftables datapath needs (as kube-proxy's nftables mode does)")
    return ""


def nftables_checks(netns: str | None) -> list[CheckItem]:
    items = []
    have = kernel_version()
    too_old = kernel_requirement()
    items.append(CheckItem("kernel for nftables", "warn" if too_old else "ok",
                           too_old or f"{_v(have)} (>= {_v(MIN_KERNEL)})",
                           "upgrade the kernel, or use the ipvs or iptables datapath"
                           if too_old else "", blocks=("nftables",) if too_old else ()))
    version = nft_version()
    if version is None:
        items.append(CheckItem("nft", "warn", "nft not found", "apt-get install nftables",
                               blocks=("nftables",)))
    elif version < MIN_NFT:
        items.append(CheckItem("nft", "warn", f"nft {_v(version)} is older than "
                               f"{_v(MIN_NFT)}", "apt-get install nftables (>= 1.0.1)",
                               blocks=("nftables",)))
    else:
        try:
            reason = NftKernel(4, netns).available()
        except KernelError as exc:
            reason = str(exc)
        items.append(CheckItem("nft", "warn" if reason else "ok",
                               reason or f"nft {_v(version)} (>= {_v(MIN_NFT)}), a test table "
                               "with a verdict map commits", "modprobe nf_tables"
                               if reason else "", blocks=("nftables",) if reason else ()))
    return items + conntrack_checks(netns)


def _service_name(chain: str) -> str:
    """service-HASH-ns/name/tcp/port -> ns/name:port (ns/name when unnamed)."""
    rest = chain.split("-", 2)[2] if chain.count("-") >= 2 else chain
    parts = rest.split("/")
    if len(parts) < 4:
        return rest
    return f"{parts[0]}/{parts[1]}" + (f":{parts[3]}" if parts[3] else "")


def _endpoints(table: NftTable, chain: str, seen: set[str]) -> list[dict[str, Any]]:
    if chain in seen or chain not in table.chains:
        return []
    seen.add(chain)
    out: list[dict[str, Any]] = []
    for rule in table.chains[chain].rules:
        m = _COUNTER.search(rule)
        if m:
            out.append({"endpoint": m[3], "packets": int(m[1]), "bytes": int(m[2])})
            continue
        t = _TARGET.search(rule)
        # affinity lookups and short-circuits ("saddr", "iifname") lead to the
        # same endpoints or to another policy's: the plain gotos are the policy
        if t and is_service_chain(t[1]) and "saddr" not in rule and "iifname" not in rule:
            out += _endpoints(table, t[1], seen)
    return out


def nftables_status(kernels: list[NftKernel]) -> dict[str, Any]:
    rows = []
    for kernel in kernels:
        try:
            table = kernel.list_table(zero_counters=False)
        except KernelError:
            table = None
        if table is None:
            continue
        for map_name, map_kind in ((SERVICE_IPS, ""), (SERVICE_NODEPORTS, "nodePort")):
            nft_map = table.sets.get(map_name)
            if nft_map is None:
                continue
            for key, value in sorted(nft_map.elements.items()):
                kind = map_kind
                parts = key.split(" . ")
                target = value.split()[-1]
                if map_name == SERVICE_NODEPORTS:
                    address, proto, port = "*", parts[0], parts[1]
                else:
                    address, proto, port = parts[0], parts[1], parts[2]
                backends = _endpoints(table, target, set())
                if not kind:
                    cluster = address in table.sets.get(CLUSTER_IPS, NftSet()).elements
                    kind = "cluster IP" if cluster else "external"
                rows.append({"family": kernel.family, "address": address, "port": int(port),
                             "protocol": proto.upper(), "service": _service_name(target),
                             "kind": kind,
                             "packets": sum(b["packets"] for b in backends),
                             "bytes": sum(b["bytes"] for b in backends),
                             "backends": backends})
    return {"datapath": "nftables", "frontends": rows}


def render_nftables(view: Mapping[str, Any]) -> str:
    return render_counts(view, "nftables (DNAT rules count new connections, per service "
                               "port)")


class PreviewNft:
    """The nftables door for `plan --against-kernel`: reads pass through, a
    transaction becomes one line per statement, nothing is committed."""

    def __init__(self, real: NftKernel, changes: list[str]) -> None:
        self.real = real
        self.changes = changes
        self.prefix = real.prefix
        self.family = real.family
        self.transactions = 0

    def list_table(self, zero_counters: bool = True) -> NftTable | None:
        return self.real.list_table(zero_counters)

    def run(self, text: str) -> None:
        self.changes.extend(f"nft {line}" for line in text.splitlines() if line)

    def generation(self) -> int | None:
        return None  # a preview always reads the table

    def run_two(self, first: str, second: str) -> None:
        """(NftKernel's: two transactions, one after the other)"""
        self.run(first)
        self.run(second)

    def conntrack_delete(self, args: list[str]) -> int:
        self.changes.append("conntrack -D " + " ".join(args))
        return 0
