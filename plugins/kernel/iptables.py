"""iptables save / restore / parse for both backends (nft and legacy), for one
IP family, in the host or in a network namespace: the door the iptables
datapath and the IPVS datapath's helper rules share.

Programming goes through `iptables-restore --noflush` (atomic per table, and the
only interface that works for both backends). python-iptables is not used: it
drives only the legacy backend, so on a host whose `iptables` is the nft variant
its rules would land in the other world silently.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .conntrack import conntrack_delete
from .netns import read_proc
from .tools import KernelError, run_tool

log = logging.getLogger(__name__)

BACKENDS = ("nft", "legacy")
#: kubelet creates this chain in the mangle table of the backend it uses
HINT_CHAIN = "KUBE-IPTABLES-HINT"
#: the tables svcproxy writes, in the order restore input lists them
TABLES = ("filter", "nat")
ChainKey = tuple[str, str]  # (table, chain)


@dataclass
class Table:
    """One table as iptables-save shows it."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)


def parse_save(text: str) -> dict[str, Table]:
    """iptables-save output -> table -> chain -> rule lines (each starting "-A")."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    rules: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), Table())
            rules = {}
        elif current is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            rules[name] = []
        elif line.startswith("-A "):
            name = line.split(" ", 2)[1]
            rules.setdefault(name, []).append(line)
        elif line == "COMMIT":
            current.chains = {k: tuple(v) for k, v in rules.items()}
    return tables


def restore_text(writes: Mapping[ChainKey, tuple[str, ...]], deletes: Iterable[ChainKey],
                 jumps: Iterable[tuple[str, str, str]] = (),
                 unjumps: Iterable[tuple[str, str, str]] = ()) -> str:
    """iptables-restore --noflush input: declaring a chain flushes it, then its
    rules; chains to delete are flushed first and removed at the end, after
    nothing refers to them any more. `jumps` / `unjumps`: (table, built-in
    chain, rule body) to insert at the top / delete."""
    builder = RestoreBuilder()
    for key in sorted(writes):
        builder.write(key, writes[key])
    return "".join(builder.parts(deletes, jumps, unjumps))


class RestoreBuilder:
    """restore_text's input built a chain at a time, for an input too large to
    hold as lines: `cut()` joins what was written since the last cut into one
    string per table (one allocation instead of a string per rule), so a
    caller can render chains in chunks and free each chunk's rules before the
    next. Declarations still precede every rule of their table."""

    def __init__(self) -> None:
        self._declared: dict[str, list[str]] = {t: [] for t in TABLES}
        self._rules: dict[str, list[str]] = {t: [] for t in TABLES}
        self._pending: dict[str, tuple[list[str], list[str]]] = {t: ([], []) for t in TABLES}

    def write(self, key: ChainKey, rules: Iterable[str]) -> None:
        names, lines = self._pending[key[0]]
        names.append(key[1])
        lines.extend(rules)

    def cut(self) -> None:
        for table, (names, lines) in self._pending.items():
            if names:
                self._declared[table].append("".join(f":{c} - [0:0]\n" for c in names))
                names.clear()
            if lines:
                self._rules[table].append("\n".join(lines) + "\n")
                lines.clear()

    def parts(self, deletes: Iterable[ChainKey], jumps: Iterable[tuple[str, str, str]] = (),
              unjumps: Iterable[tuple[str, str, str]] = ()) -> list[str]:
        """The whole input, in order; empty if there is nothing to do."""
        self.cut()
        deletes = list(deletes)
        jumps = list(jumps)
        unjumps = list(unjumps)
        out: list[str] = []
        for table in TABLES:
            d = sorted(c for t, c in deletes if t == table)
            j = [(c, body) for t, c, body in jumps if t == table]
            u = [(c, body) for t, c, body in unjumps if t == table]
            if not (self._declared[table] or d or j or u):
                continue
            tail = [f"-D {c} {body}" for c, body in u]
            # inserted at position 1 in reverse, so they end up in the given order
            tail += [f"-I {c} 1 {body}" for c, body in reversed(j)]
            tail += [f"-X {c}" for c in d]
            out.append(f"*{table}\n")
            out += self._declared[table]
            if d:
                out.append("".join(f":{c} - [0:0]\n" for c in d))
            out += self._rules[table]
            out.append("".join(line + "\n" for line in tail) + "COMMIT\n")
        return out


#: an iptables-restore input: one string, or its parts in order (each part
#: whole lines)
RestoreInput = str | Sequence[str]


def joined(text: RestoreInput) -> str:
    return text if isinstance(text, str) else "".join(text)


def input_lines(text: RestoreInput) -> Iterator[str]:
    """The lines of a restore input, part after part."""
    for part in [text] if isinstance(text, str) else text:
        yield from part.splitlines()


def line_at(text: RestoreInput, n: int) -> str | None:
    """Line `n` (from 1) of a restore input, None past its end."""
    for i, line in enumerate(input_lines(text), 1):
        if i == n:
            return line
    return None


class IptablesKernel:
    """Runs the iptables tools for one family and backend, optionally inside a
    network namespace (tests and benchmarks use one as the "node")."""

    def __init__(self, family: int = 4, backend: str = "nft", netns: str | None = None,
                 timeout: float = 900.0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        self.family = family
        self.backend = backend
        self.netns = netns
        self.timeout = timeout
        #: how many restores this object ran (tests check "no change, no write")
        self.restores = 0
        #: keep the last restore input (benchmarks): off by default, since at
        #: 10,000 services a first sync's input is a 24 MB string
        self.keep_last_restore = False
        self.last_restore = ""

    # -- commands ------------------------------------------------------------------

    def tool(self, name: str) -> str:
        """e.g. tool("save") -> "ip6tables-nft-save"."""
        base = "iptables" if self.family == 4 else "ip6tables"
        return f"{base}-{self.backend}" + ("" if name == "" else f"-{name}")

    def run(self, args: Sequence[str], stdin: RestoreInput | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool(args, self.netns, stdin=stdin, check=check, timeout=self.timeout)

    def available(self) -> str | None:
        """None when the tools work here, else why not."""
        for name in ("save", "restore"):
            if shutil.which(self.tool(name)) is None:
                return f"{self.tool(name)} not found (install the iptables package)"
        try:
            self.run([self.tool(""), "-w", "5", "-t", "nat", "-S", "POSTROUTING"])
            self.run([self.tool(""), "-w", "5", "-t", "filter", "-S", "FORWARD"])
        except KernelError as exc:
            return f"the kernel refused iptables ({self.backend} backend): {exc}"
        return None

    def save(self, table: str) -> dict[str, tuple[str, ...]]:
        text = self.run([self.tool("save"), "-t", table]).stdout
        return parse_save(text).get(table, Table()).chains

    def save_all(self) -> dict[ChainKey, tuple[str, ...]]:
        """Every table's chains from one iptables-save (one process, not one per
        table: every exec counts on a busy node)."""
        text = self.run([self.tool("save")]).stdout
        return {(t, c): rules for t, table in parse_save(text).items()
                for c, rules in table.chains.items()}

    def restore(self, text: RestoreInput) -> None:
        """iptables-restore --noflush of `text` (a string, or its parts in
        order: a full sync's input is built chunk by chunk)."""
        self.restores += 1
        if self.keep_last_restore:
            self.last_restore = joined(text)
        self._restore(text)

    def check_restore(self, text: RestoreInput) -> None:
        """`iptables-restore --test`: parse and build the input, commit nothing.
        The tool asks the kernel for each match's and target's revision, so the
        kernel loads their modules (a modprobe each) as a real restore would."""
        self._restore(text, "--test")

    def _restore(self, text: RestoreInput, *flags: str) -> None:
        proc = self.run([self.tool("restore"), "-w", "5", "--noflush", *flags], stdin=text,
                        check=False)
        if proc.returncode != 0:
            raise KernelError(_explain_restore_failure(proc.stderr, text))

    def conntrack_delete(self, args: Sequence[str]) -> int:
        return conntrack_delete(args, self.family, self.netns)


def _explain_restore_failure(stderr: str, text: RestoreInput) -> str:
    m = re.search(r"line:? (\d+)", stderr)
    detail = stderr.strip()
    if m:
        line = line_at(text, int(m.group(1)))
        if line is not None:
            detail += f" (input line {m.group(1)}: {line[:200]})"
    return f"iptables-restore failed; nothing in the failed table was changed: {detail}"


def detect_backend(family: int = 4, netns: str | None = None) -> tuple[str, str]:
    """The backend the host already uses, as kube-proxy's iptables wrapper
    decides it: the one holding kubelet's hint chain, else the one with more
    rules, else the system's default `iptables`. Returns (backend, why)."""
    counts: dict[str, int] = {}
    for backend in BACKENDS:
        k = IptablesKernel(family, backend, netns)
        if shutil.which(k.tool("save")) is None:
            continue
        if backend == "legacy" and not legacy_tables_loaded(k):
            # iptables-legacy-save would create empty legacy tables, after which
            # every iptables-nft command warns about them: look, do not touch
            counts[backend] = 0
            continue
        try:  # one save of every table: the hint chain is in its mangle part
            text = k.run([k.tool("save")], check=False).stdout
        except KernelError:
            continue
        if f":{HINT_CHAIN} " in _table_part(text, "mangle"):
            return backend, f"kubelet's {HINT_CHAIN} chain is in the {backend} tables"
        counts[backend] = sum(1 for line in text.splitlines() if line.startswith("-A "))
    if counts and max(counts.values()) > 0:
        best = max(counts, key=lambda b: (counts[b], b == "nft"))
        return best, f"the {best} backend holds the most rules ({counts})"
    default = _system_default()
    return default, f"no rules yet; the system default iptables is {default}"


def _table_part(text: str, table: str) -> str:
    """The `*table` ... COMMIT part of iptables-save's text ('' if absent)."""
    start = text.find(f"*{table}\n")
    if start < 0:
        return ""
    end = text.find("\nCOMMIT", start)
    return text[start:] if end < 0 else text[start:end]


def legacy_tables_loaded(kernel: IptablesKernel) -> bool:
    """Whether any legacy (x_tables) table exists in the kernel's namespace
    (read from a thread inside it: no process)."""
    names = "ip_tables_names" if kernel.family == 4 else "ip6_tables_names"
    try:
        text = read_proc(f"/proc/thread-self/net/{names}", kernel.netns)
    except OSError:  # the namespace is gone
        return False
    return bool(text and text.strip())


def _system_default() -> str:
    path = shutil.which("iptables")
    if path is None:
        return "nft"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "nft"
    return "legacy" if "legacy" in out else "nft"
