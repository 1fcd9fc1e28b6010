"""nftables for one table of one IP family (`ip kube-proxy`, `ip6 kube-proxy`),
in the host or in a network namespace: the door the nftables datapath uses.

Programming goes through `nft -f -`: one transaction per call, applied
entirely or not at all. A transaction that declares nothing (a partial
sync, the rules and elements of a new table) is compiled and committed over
nf_tables netlink instead (nft_netlink.py), equally all or nothing: `nft`
would first fetch the whole table's chains and sets (0.3-0.6 s at 50,000
services for a change of six statements) and parse the text. Reading goes
through `nft list table`, parsed into `NftTable` (chains with their rule
lines, sets and maps with their elements) in the text nft prints, which is
also the text the datapath renders, so the two compare line by line. Only
the named table is ever read, written or deleted: the rest of the ruleset
belongs to others.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import nft_netlink
from .conntrack import conntrack_delete
from .tools import KernelError, run_tool

log = logging.getLogger(__name__)

TABLE = "kube-proxy"
#: kube-proxy's nftables mode needs these (pkg/proxy/nftables, knftables)
MIN_KERNEL = (5, 13)
MIN_NFT = (1, 0, 1)

_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
#: set and map declarations and deletions, and table deletions, in a transaction
_SET_STATEMENT = re.compile(r"^(add|delete) (?:(?:set|map) \S+ \S+ (\S+)(?: \{ (.*) \})?"
                            r"|table .*)$", re.MULTILINE)


@dataclass
class NftChain:
    """One chain as `nft list table` shows it: the lines before its rules (a base
    chain's `type ... hook ... priority ...; policy ...;`, a `comment "..."`)
    and its rules."""

    header: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()


@dataclass
class NftSet:
    """One set or map: its declaration lines (type, size, flags, timeout,
    comment) and its elements, key -> value ("" for a set)."""

    kind: str = "set"  # or "map"
    header: tuple[str, ...] = ()
    elements: dict[str, str] = field(default_factory=dict)


@dataclass
class NftTable:
    chains: dict[str, NftChain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)
    comment: str = ""


def family_word(family: int) -> str:
    return "ip6" if family == 6 else "ip"


def split_elements(text: str) -> Iterator[str]:
    """The elements of `{ a, b : c, ... }` (braces stripped), split at commas
    outside quotes."""
    start = 0
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            part = text[start:i].strip()
            if part:
                yield part
            start = i + 1
    part = text[start:].strip()
    if part:
        yield part


_ELEMENT_COMMENT = re.compile(r' comment "[^"]*"')


def parse_element(text: str) -> tuple[str, str]:
    """`key : value` -> (key, value); a set element -> (key, ""). An element's
    comment and a dynamic element's timeout/expires are not part of its key."""
    text = _ELEMENT_COMMENT.sub("", text)
    key, sep, value = text.partition(" : ")
    key = key.split(" timeout ", 1)[0].split(" expires ", 1)[0]
    return key.strip(), value.strip() if sep else ""


def parse_table(text: str, zero_counters: bool = True) -> NftTable:
    """`nft list table` output -> NftTable. Counters read as zero unless
    `zero_counters` is off (comparison wants the rule, status wants the count)."""
    table = NftTable()
    lines = text.splitlines()
    i, n = 0, len(lines)
    while i < n:
        line = lines[i].strip()
        i += 1
        if line.startswith("comment ") and not table.chains and not table.sets:
            table.comment = line[len("comment "):].strip('"')
        elif line.startswith(("chain ", "set ", "map ")) and line.endswith("{"):
            kind, name = line[:-1].split()[:2]
            body: list[str] = []
            while i < n and lines[i].strip() != "}":
                body.append(lines[i].strip())
                i += 1
            i += 1
            if kind == "chain":
                table.chains[name] = _chain(body, zero_counters)
            else:
                table.sets[name] = _set(kind, body)
    return table


def _chain(body: list[str], zero_counters: bool) -> NftChain:
    header: list[str] = []
    rules: list[str] = []
    for line in body:
        if not line:
            continue
        if not rules and line.startswith(("type ", "comment ")):
            header.append(line)
        else:
            rules.append(_COUNTER.sub("counter packets 0 bytes 0", line)
                         if zero_counters and "counter packets" in line else line)
    return NftChain(tuple(header), tuple(rules))


def _set(kind: str, body: list[str]) -> NftSet:
    header: list[str] = []
    elements: dict[str, str] = {}
    j = 0
    while j < len(body):
        line = body[j]
        j += 1
        if line.startswith("elements = {"):
            text = line[len("elements = {"):]
            while not text.rstrip().endswith("}") and j < len(body):
                text += " " + body[j]
                j += 1
            for element in split_elements(text.rstrip().removesuffix("}")):
                key, value = parse_element(element)
                elements[key] = value
        elif line:
            header.append(line)
    return NftSet(kind, tuple(header), elements)


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def kernel_version() -> tuple[int, ...]:
    return _version(os.uname().release)


def nft_version() -> tuple[int, ...] | None:
    """nft's version, None when nft is not installed."""
    if shutil.which("nft") is None:
        return None
    try:
        return _version(run_tool(["nft", "--version"], timeout=30).stdout)
    except KernelError:
        return None


def explain_failure(stderr: str, text: str) -> str:
    """nft's error, with the statement it refused (nft names it by line)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    first = next((ln for ln in lines if "Error:" in ln), lines[0] if lines else "")
    m = re.match(r"^/dev/stdin:(\d+):", first)
    message = first.split("Error:", 1)[-1].strip() if "Error:" in first else first
    if m:
        stmts = text.splitlines()
        number = int(m.group(1))
        if 0 < number <= len(stmts):
            stmt = stmts[number - 1]
            stmt = stmt if len(stmt) <= 300 else stmt[:300] + " ..."
            return f"{message} (in: {stmt})"
    return message


class NftKernel:
    """One nftables table (`<family> kube-proxy`) in the host or `netns`."""

    def __init__(self, family: int = 4, netns: str | None = None, table: str = TABLE) -> None:
        self.family = family
        self.netns = netns
        self.table = table
        self.word = family_word(family)
        #: transactions committed (tests count them), and how many of them
        #: went over netlink rather than through `nft -f`
        self.transactions = 0
        self.netlink_transactions = 0
        #: compiled transactions over netlink (False: always `nft -f`)
        self.netlink = True
        #: key types of the table's sets and maps, as last written or listed
        #: (element keys are encoded from them)
        self.key_types: dict[str, tuple[str, ...]] = {}
        #: the netlink socket for generation queries and commits, kept open
        self.channel = nft_netlink.Channel(netns)

    def close(self) -> None:
        """Close the netlink socket (it opens again when needed)."""
        self.channel.close()

    @property
    def prefix(self) -> str:
        """`ip kube-proxy`: what every statement names."""
        return f"{self.word} {self.table}"

    def run(self, text: str) -> None:
        """Commit one transaction: all of it or, on error, none. One whose
        every statement nft_netlink compiles goes over netlink, the rest
        through `nft -f -`."""
        if text:
            self._send(text, self._compile(text, self.key_types))

    def run_two(self, first: str, second: str) -> None:
        """Commit `first`, then `second`, as two transactions: while `nft -f`
        commits the first (declarations), the second is compiled for netlink
        (the two cores of a small node both work). Nothing of the second is
        sent when the first fails."""
        types = dict(self.key_types)
        _learn(types, first)
        failure: list[BaseException] = []

        def commit_first() -> None:
            try:
                self.run(first)
            except BaseException as exc:  # (raised in the caller's thread)
                failure.append(exc)

        worker = threading.Thread(target=commit_first, name="nft-first")
        worker.start()
        try:
            batch = self._compile(second, types)
        finally:
            worker.join()
        if failure:
            raise failure[0]
        self._send(second, batch)

    def _send(self, text: str, batch: nft_netlink.Batch | None) -> None:
        """Commit `text`: as its batch when it compiled, else through nft."""
        if batch is None:
            self._nft_f(text)
        else:
            self._commit(batch)
        self.transactions += 1
        _learn(self.key_types, text)

    def _compile(self, text: str, types: dict[str, tuple[str, ...]]
                 ) -> nft_netlink.Batch | None:
        """The netlink batch for `text`; None when netlink is off or a
        statement is not one nft_netlink compiles."""
        if not self.netlink:
            return None
        try:
            return nft_netlink.compile_batch(text, self.family, self.table, types.get)
        except nft_netlink.Unsupported:
            return None
        except Exception as exc:  # a compiler bug: nothing was sent, nft can do it
            log.warning("nftables netlink compiler failed (%s: %s); using nft -f",
                        type(exc).__name__, exc)
            return None

    def _commit(self, batch: nft_netlink.Batch) -> None:
        try:
            self.channel.commit(batch)
        except nft_netlink.Refused as exc:
            outcome = "whether it committed is not known" if exc.unknown else \
                "nothing of it was committed"
            raise KernelError(f"nftables refused a transaction on table {self.prefix} "
                              f"({outcome}): {exc}") from None
        except (nft_netlink.Unsupported, OSError):
            # too large for one sendmsg, or no netlink socket here: nothing
            # was sent, nft decides
            self._nft_f(batch.text)
            return
        self.netlink_transactions += 1

    def _nft_f(self, text: str) -> None:
        proc = run_tool(["nft", "-f", "-"], self.netns, stdin=text, check=False)
        if proc.returncode != 0:
            raise KernelError(f"nft -f (table {self.prefix}) failed: "
                              f"{explain_failure(proc.stderr, text)}")

    def generation(self) -> int | None:
        """The namespace's ruleset generation (ruleset_generation)."""
        return ruleset_generation(self.netns, self.channel)

    def list_text(self) -> str | None:
        """`nft list table`, None when the table does not exist."""
        if table_exists(self.family, self.table, self.netns, self.channel) is False:
            return None
        proc = run_tool(["nft", "list", "table", self.word, self.table], self.netns,
                        check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise KernelError(f"nft list table {self.prefix} failed: {proc.stderr.strip()}")
        return proc.stdout

    def list_table(self, zero_counters: bool = True) -> NftTable | None:
        text = self.list_text()
        table = None if text is None else parse_table(text, zero_counters)
        self.key_types = {} if table is None else {
            name: types for name, s in table.sets.items()
            if (types := nft_netlink.key_types(s.header)) is not None}
        return table

    def delete_table(self) -> bool:
        """Delete the table (and everything in it); False when there was none
        (asked over netlink first: most nodes have none, and an nft process
        costs more than the question)."""
        if table_exists(self.family, self.table, self.netns, self.channel) is False:
            return False
        proc = run_tool(["nft", "delete", "table", self.word, self.table], self.netns,
                        check=False)
        if proc.returncode == 0:
            return True
        if "No such file or directory" in proc.stderr:
            return False
        raise KernelError(f"nft delete table {self.prefix} failed: {proc.stderr.strip()}")

    def available(self) -> str | None:
        """None when nftables works here, else why not: nft present and new
        enough, and a throwaway table with a verdict map, a NAT base chain and
        a numgen rule commits and goes away (a functional probe, as the IPVS
        probe adds a test virtual server)."""
        version = nft_version()
        if version is None:
            return "nft not found (install the nftables package)"
        if version < MIN_NFT:
            return (f"nft {'.'.join(map(str, version))} is too old (svcproxy needs "
                    f"{'.'.join(map(str, MIN_NFT))} or later)")
        probe = f"svcproxy-probe-{os.getpid()}"
        name = f"{self.word} {probe}"
        text = "\n".join([
            f"add table {name}",
            f"add chain {name} probe-nat {{ type nat hook prerouting priority -100 ; }}",
            f"add chain {name} probe-target",
            f"add map {name} probe-map {{ type {addr_type(self.family)} . inet_proto . "
            f"inet_service : verdict ; }}",
            f"add chain {name} probe-target2",
            f"add rule {name} probe-nat {self.word} daddr . meta l4proto . th dport "
            "vmap @probe-map",
            f"add rule {name} probe-target numgen random mod 2 0 goto probe-target2",
            f"delete table {name}",
        ]) + "\n"
        proc = run_tool(["nft", "-f", "-"], self.netns, stdin=text, check=False)
        if proc.returncode != 0:
            return f"nftables does not work here: {explain_failure(proc.stderr, text)}"
        return None

    def conntrack_delete(self, args: list[str]) -> int:
        return conntrack_delete(args, self.family, self.netns)


NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_GETGEN = 16
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1
NFTA_TABLE_NAME = 1


def _learn(types: dict[str, tuple[str, ...]], text: str) -> None:
    """Keep in `types` the key types of the sets and maps a transaction
    declares or deletes."""
    if " set " not in text and " map " not in text and " table " not in text:
        return  # (a scan of the whole text costs 70 ms at 10,000 services)
    for m in _SET_STATEMENT.finditer(text):
        verb, name, body = m.groups()
        if name is None:  # a table
            if verb == "delete":
                types.clear()
        elif verb == "delete":
            types.pop(name, None)
        else:
            key = nft_netlink.key_types((body or "").split(" ; "))
            if key is not None:
                types[name] = key


def _query(netns: str | None, msg: int, nfproto: int, attrs: bytes = b"",
           channel: nft_netlink.Channel | None = None
           ) -> tuple[bytes, list[tuple[int, int, int]]] | None:
    """One nf_tables netlink request in `netns` (on `channel`, or a socket of
    its own) and its answer (nft_netlink.Channel.request)."""
    if channel is not None:
        return channel.request(msg, nfproto, attrs)
    own = nft_netlink.Channel(netns)
    try:
        return own.request(msg, nfproto, attrs)
    finally:
        own.close()


def ruleset_generation(netns: str | None = None,
                       channel: nft_netlink.Channel | None = None) -> int | None:
    """The nftables ruleset generation of `netns` (NFT_MSG_GETGEN): the kernel
    adds one with every committed transaction, anybody's; None when it cannot
    be read."""
    from .netlink import each_attr

    answer = _query(netns, NFT_MSG_GETGEN, 0, channel=channel)  # AF_UNSPEC
    if answer is None:
        return None
    data, messages = answer
    for mtype, start, end in messages:
        if mtype != NFT_MSG_NEWGEN:
            continue
        for kind, vstart, vend in each_attr(data, start + 4, end):
            if kind == NFTA_GEN_ID and vend - vstart >= 4:
                return int(struct.unpack_from(">I", data, vstart)[0])
    return None


def table_exists(family: int, table: str, netns: str | None = None,
                 channel: nft_netlink.Channel | None = None) -> bool | None:
    """Whether nftables table `table` of `family` (4/6) exists in `netns`
    (NFT_MSG_GETTABLE: no nft process for the common "not there"); None when
    netlink cannot tell (no nf_tables: then nft cannot either)."""
    from .netlink import NLMSG_ERROR, _attr, error_code

    attr = _attr(NFTA_TABLE_NAME, table.encode() + b"\0")
    answer = _query(netns, NFT_MSG_GETTABLE, nft_netlink.NFPROTO[family], attr, channel=channel)
    if answer is None:
        return None
    data, messages = answer
    for mtype, start, _ in messages:
        if mtype == NFT_MSG_NEWTABLE:
            return True
        if mtype == NLMSG_ERROR:  # only ENOENT says "not there"; the rest: ask nft
            return False if error_code(data, start) == errno.ENOENT else None
    return None


def addr_type(family: int) -> str:
    return "ipv6_addr" if family == 6 else "ipv4_addr"
