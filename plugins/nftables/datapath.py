"""Reconciling one family's nftables table with the plan.

The desired table is the skeleton (config only) plus one block per service
port (rules.py). Three diff stores remember what the kernel holds: chains
(name -> header and rules), sets and maps (name -> declaration) and elements
((set, key) -> value). Both kinds of sync go through the same comparison,
over different keys:

- partial: only the service ports the delta touched are re-rendered, and only
  their chains, sets and elements compared; nothing is listed from the kernel
  (upstream listed every chain on every sync: 16 minutes at 44,000 services,
  kubernetes #139513);
- full: everything is rendered and compared with `nft list table`, so drift is
  repaired and leftovers flushed. A table whose fixed part differs (a base
  chain's priority, a map's type, a set svcproxy does not know) is rebuilt in
  the same transaction: delete and create commit together, so no packet sees
  it half-built.

Each sync is one transaction (NftKernel sends it over nf_tables netlink, or
through `nft -f` when it declares something); a new table is two, its
declarations first. Chains that fall out of use are
flushed at once and deleted at a later sync, at least a second after: a
kernel before 6.2 still counts a verdict-map element's reference to a chain
for a moment after the element is deleted (kube-proxy does the same).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from svcproxy.diffstore import Diff, DiffStore, diff_items
from svcproxy.ir import FrontendKey, ServiceMap
from svcproxy.phases import phase
from svcproxy.plugins.iptables.datapath import (
    Digest,
    SPKey,
    clear_stale_udp,
    digest,
    port_groups,
    rule_count,
    touched_ports,
)
from svcproxy.plugins.kernel.nftables import NftKernel
from svcproxy.plugins.kernel.tools import KernelError

from .rules import (
    AFFINITY_PREFIX,
    BASE_CHAINS,
    FIREWALL_PREFIX,
    SHARED_SETS,
    TABLE_COMMENT,
    Chain,
    ElementKey,
    NftOptions,
    ServicePortBlock,
    Skeleton,
    is_service_chain,
    service_port_block,
    skeleton,
)

log = logging.getLogger(__name__)

SetDecl = tuple[str, tuple[str, ...]]  # (kind, declaration lines)
#: a chain as the store remembers it: its header lines and the digest of its
#: rules (iptables' Digest: hash and count in one int), not the rules' text,
#: which is rendered again when the chain is written (the text of every
#: chain, kept, was ~10 MB at 10,000 services and ~45 MB at 50,000)
ChainState = tuple[tuple[str, ...], Digest]
_NO_RULES: tuple[str, ...] = ()


def stored(chain: Chain) -> ChainState:
    return chain[0], digest(chain[1])


@dataclass(frozen=True, slots=True)
class KeptBlock:
    """What the state keeps of a service port's block once it is written: its
    chains by name (their digests are in the store), its sets and elements."""

    names: tuple[str, ...]
    elements: dict[ElementKey, str]
    sets: dict[str, tuple[str, ...]]
    udp_targets: tuple[tuple[str, int], ...]
    endpoints: frozenset[str]


def kept(block: ServicePortBlock) -> KeptBlock:
    return KeptBlock(tuple(block.chains), block.elements, block.sets, block.udp_targets,
                     block.endpoints)
#: a stale chain is deleted this long after it was flushed
STALE_DELAY = 1.0


def render_blocks(plan: ServiceMap, keys: Iterable[SPKey] | None,
                  opts: NftOptions) -> dict[SPKey, ServicePortBlock]:
    """Blocks for the given service ports (all when keys is None) in the family
    of `opts`; `plan` may hold both families."""
    return {key: service_port_block(fes, opts)
            for key, fes in port_groups(plan, keys, opts.family).items()}


@dataclass
class Desired:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, SetDecl] = field(default_factory=dict)
    elements: dict[ElementKey, str] = field(default_factory=dict)


def desired_table(blocks: Mapping[SPKey, ServicePortBlock], opts: NftOptions) -> Desired:
    """The whole table: skeleton first, then the service ports in order."""
    sk = skeleton(opts)
    out = Desired(dict(sk.chains), dict(sk.sets), dict(sk.elements))
    for key in sorted(blocks):
        block = blocks[key]
        out.sets.update((name, ("set", decl)) for name, decl in block.sets.items())
        out.chains.update(block.chains)
        out.elements.update(block.elements)
    return out


def render_nft(plan: ServiceMap, opts: NftOptions) -> str:
    """What `svcproxy plan -o nft` prints for one family: the table as `nft list
    table` shows it after a first sync (elements sorted: the kernel lists a
    hash set's elements in its own order)."""
    d = desired_table(render_blocks(plan, None, opts), opts)
    by_set: dict[str, list[tuple[str, str]]] = {}
    for (name, key), value in d.elements.items():
        by_set.setdefault(name, []).append((key, value))
    word = opts.ip
    out = [f"table {word} kube-proxy {{", f'\tcomment "{TABLE_COMMENT}"']
    parts: list[list[str]] = []
    for name, (kind, decl) in d.sets.items():
        lines = [f"\t{kind} {name} {{", *(f"\t\t{line}" for line in decl)]
        elements = sorted(by_set.get(name, ()), key=_element_order)
        if elements:
            texts = [f"{k} : {v}" if v else k for k, v in elements]
            lines.append("\t\telements = { " + ",\n\t\t\t     ".join(texts) + " }")
        parts.append([*lines, "\t}"])
    for name, (header, rules) in d.chains.items():
        parts.append([f"\tchain {name} {{", *(f"\t\t{line}" for line in (*header, *rules)),
                      "\t}"])
    for i, part in enumerate(parts):
        if i:
            out.append("")
        out.extend(part)
    out.append("}")
    return "\n".join(out) + "\n"


def _element_order(item: tuple[str, str]) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in item[0].split(" . "))


# ---- transactions ------------------------------------------------------------------

class Transaction:
    """Statements for one `nft -f`, in the order the kernel needs them: sets and
    chains exist before rules and elements name them, references go before
    what they reference."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.head: list[str] = []  # table, sets, chains
        self.flushes: list[str] = []
        self.element_deletes: list[str] = []
        self.set_deletes: list[str] = []
        self.set_adds: list[str] = []
        self.rules: list[str] = []
        self.element_adds: list[str] = []
        self.chain_deletes: list[str] = []
        #: each list's length at the last cut()
        self._marks = [0] * 8

    def __bool__(self) -> bool:
        return any(self._lists())

    def _lists(self) -> tuple[list[str], ...]:
        return (self.head, self.flushes, self.element_deletes, self.set_deletes,
                self.set_adds, self.rules, self.element_adds, self.chain_deletes)

    def cut(self) -> None:
        """Join each kind's statements since the last cut into one string: a
        full sync writes a chunk of service ports at a time and frees each
        chunk's rules before the next (one allocation instead of a string per
        statement; `text()` is the same)."""
        marks = self._marks
        for i, lst in enumerate(self._lists()):
            if len(lst) > marks[i] + 1:
                lst[marks[i]:] = ["\n".join(lst[marks[i]:])]
            marks[i] = len(lst)

    def add_table(self) -> None:
        self.head.append(f'add table {self.prefix} {{ comment "{TABLE_COMMENT}" ; }}')

    def add_set(self, name: str, decl: SetDecl, late: bool = False) -> None:
        kind, lines = decl
        text = f"add {kind} {self.prefix} {name} {{ " + " ; ".join(lines) + " ; }"
        (self.set_adds if late else self.head).append(text)

    def delete_set(self, name: str, kind: str = "set") -> None:
        self.set_deletes.append(f"delete {kind} {self.prefix} {name}")

    def write_chain(self, name: str, chain: Chain, exists: bool) -> None:
        header, rules = chain
        base = next((b for b in BASE_CHAINS if b.name == name), None)
        if base is not None:
            self.head.append(f"add chain {self.prefix} {name} {base.declaration()}")
        elif header:
            self.head.append(f"add chain {self.prefix} {name} {{ " + " ; ".join(header) + " ; }")
        elif not exists:
            # (an "add" of a chain that is there costs the kernel a commit of
            # its own kind, 10-20 ms: a rewritten chain is only flushed)
            self.head.append(f"add chain {self.prefix} {name}")
        if exists:
            self.flushes.append(f"flush chain {self.prefix} {name}")
        self.add_rules(name, rules)

    def add_rules(self, name: str, rules: Iterable[str]) -> None:
        self.rules.extend(f"add rule {self.prefix} {name} {rule}" for rule in rules)

    def flush_chain(self, name: str) -> None:
        self.flushes.append(f"flush chain {self.prefix} {name}")

    def delete_chain(self, name: str) -> None:
        self.chain_deletes.append(f"delete chain {self.prefix} {name}")

    def elements(self, adds: Mapping[ElementKey, str], deletes: Iterable[ElementKey]) -> None:
        gone: dict[str, list[str]] = {}
        for name, key in deletes:
            gone.setdefault(name, []).append(key)
        for name, keys in gone.items():
            self.element_deletes.append(f"delete element {self.prefix} {name} {{ "
                                        + ", ".join(keys) + " }")
        new: dict[str, list[str]] = {}
        for (name, key), value in adds.items():
            new.setdefault(name, []).append(f"{key} : {value}" if value else key)
        for name, items in new.items():
            for i in range(0, len(items), 1000):
                self.element_adds.append(f"add element {self.prefix} {name} {{ "
                                         + ", ".join(items[i:i + 1000]) + " }")

    def text(self) -> str:
        lines = [*self.head, *self.flushes, *self.element_deletes, *self.set_deletes,
                 *self.set_adds, *self.rules, *self.element_adds, *self.chain_deletes]
        return "\n".join(lines) + "\n" if lines else ""


# ---- state and sync ----------------------------------------------------------------------

@dataclass
class FamilyState:
    kernel: NftKernel
    blocks: dict[SPKey, KeptBlock] = field(default_factory=dict)
    chains: DiffStore[str, ChainState] = field(default_factory=DiffStore)
    sets: DiffStore[str, SetDecl] = field(default_factory=DiffStore)
    elements: DiffStore[ElementKey, str] = field(default_factory=DiffStore)
    #: how many service ports hold each element of a shared set (the ports of
    #: a Service share its ClusterIP, services share endpoints)
    shared_users: dict[ElementKey, int] = field(default_factory=dict)
    #: chains flushed and waiting to be deleted, with when they were flushed
    stale: dict[str, float] = field(default_factory=dict)
    plan: ServiceMap = field(default_factory=ServiceMap)
    clock: Callable[[], float] = time.monotonic

    @property
    def known(self) -> bool:
        return self.chains.known and self.sets.known and self.elements.known

    def forget(self) -> None:
        self.chains.forget()
        self.sets.forget()
        self.elements.forget()


@dataclass
class FamilyResult:
    chains_written: int = 0
    chains_flushed: int = 0
    chains_deleted: int = 0
    elements: int = 0
    sets: int = 0
    rebuilt: bool = False
    #: a full sync read the table back (False: the ruleset generation showed
    #: that nobody had committed since svcproxy's last transaction)
    listed: bool = True
    transactions: int = 0
    conntrack_deleted: int = 0
    #: stale chains are waiting to be deleted: sync again later
    followup: bool = False

    @property
    def changes(self) -> int:
        return self.chains_written + self.chains_flushed + self.chains_deleted + \
            self.elements + self.sets


def _shared(block: ServicePortBlock | KeptBlock | None) -> list[ElementKey]:
    if block is None:
        return []
    return [k for k in block.elements if k[0] in SHARED_SETS]


def sync_family(state: FamilyState, plan: ServiceMap, changed: Iterable[FrontendKey] | None,
                opts: NftOptions, trusted: bool = False) -> FamilyResult:
    """Bring family `opts.family`'s table to `plan` (which may hold both
    families). `changed` None = full sync; `trusted`: nobody but svcproxy has
    committed in the namespace since the stores were last read or written
    (the ruleset generation says so), so a full sync need not list the table."""
    result = FamilyResult()
    now = state.clock()
    _delete_stale(state, now, result)
    if changed is None or not state.known:
        sk = skeleton(opts)
        exists, why = _read_for_full(state, sk, result, trusted)
        blocks = _write_full(state, plan, opts, sk, result, exists, why)
        state.shared_users = _count_users(blocks)
    else:
        with phase("render"):
            touched = touched_ports(changed, plan, state.plan)
            fresh = render_blocks(plan, touched, opts)
            blocks = dict(state.blocks)
            for key in touched:
                blocks.pop(key, None)
            blocks.update((k, kept(b)) for k, b in fresh.items())
        _partial(state, touched, fresh, result)
    with phase("conntrack"):
        result.conntrack_deleted = clear_stale_udp(state.kernel, state.blocks, blocks)
    state.blocks = blocks
    state.plan = plan
    result.followup = bool(state.stale)
    return result


def _count_users(blocks: Mapping[SPKey, ServicePortBlock | KeptBlock]
                 ) -> dict[ElementKey, int]:
    """How many service ports hold each element of a shared set."""
    users: dict[ElementKey, int] = {}
    for block in blocks.values():
        for key in _shared(block):
            users[key] = users.get(key, 0) + 1
    return users


def sync_first(state: FamilyState, plan: ServiceMap, opts: NftOptions) -> FamilyResult | None:
    """A cold start's first write (family `opts.family`): without a table, the
    table with only `plan`'s service ports; with one, their chains, sets and
    elements added in one transaction, nothing else changed. None when the
    table is there but must be rebuilt (another layout): the full sync does
    that in one transaction anyway."""
    result = FamilyResult()
    if not state.known:
        exists = _read(state)
        if not exists:  # (listing a table that is not there costs no process)
            _write_full(state, plan, opts, skeleton(opts), result, False, "")
        elif _fixed_part_differs(state, skeleton(opts)):
            return None
    with phase("render"):
        fresh = render_blocks(plan, None, opts)
    if not result.transactions:
        state.shared_users = {}
        state.blocks = {}
        _partial(state, set(fresh), fresh, result)
    state.shared_users = _count_users(fresh)
    with phase("conntrack"):
        result.conntrack_deleted = clear_stale_udp(state.kernel, {}, fresh)
    state.blocks = {k: kept(b) for k, b in fresh.items()}
    state.plan = plan
    return result


def _delete_stale(state: FamilyState, now: float, result: FamilyResult) -> None:
    """Delete chains flushed at least STALE_DELAY ago, in their own transaction
    (a refusal is logged and retried: they are empty and harmless)."""
    due = sorted(c for c, t in state.stale.items() if now - t >= STALE_DELAY)
    if not due or not state.chains.known:
        return
    tx = Transaction(state.kernel.prefix)
    for name in due:
        tx.delete_chain(name)
    try:
        with phase("stale"):
            state.kernel.run(tx.text())
    except Exception as exc:  # logged, and retried at the next sync
        log.warning("could not delete %d stale nftables chains (retried later): %s",
                    len(due), exc)
        return
    for name in due:
        state.stale.pop(name, None)
        state.chains.set(name, None)
    result.chains_deleted += len(due)
    result.transactions += 1


def _read(state: FamilyState) -> bool:
    """Load the stores from `nft list table`; whether the table exists."""
    with phase("read"):
        table = state.kernel.list_table()
    if table is None:
        state.chains.load({})
        state.sets.load({})
        state.elements.load({})
        return False
    state.chains.load({n: (c.header, digest(c.rules)) for n, c in table.chains.items()})
    state.sets.load({n: (s.kind, s.header) for n, s in table.sets.items()})
    state.elements.load({(n, k): v for n, s in table.sets.items()
                         if not n.startswith(AFFINITY_PREFIX) for k, v in s.elements.items()})
    return True


def _fixed_part_differs(state: FamilyState, sk: Skeleton) -> str:
    """Why the table must be rebuilt ("" if it need not): a base chain or a
    shared map/set differs, the table holds a set svcproxy does not know, or
    an affinity-* one that is not a set (svcproxy's always are)."""
    for b in BASE_CHAINS:
        have = state.chains.get(b.name)
        if have is not None and have[0] != sk.chains[b.name][0]:
            return f"base chain {b.name} is {have[0][0] if have[0] else '?'}"
    for name, decl in state.sets.have.items():
        if name.startswith(AFFINITY_PREFIX):
            if decl[0] != "set":
                return f"{name} is a {decl[0]}, not a set"
            continue
        want = sk.sets.get(name)
        if want is None:
            return f"{decl[0]} {name} is not svcproxy's"
        if want[0] != decl[0]:
            return f"{name} is a {decl[0]}, not a {want[0]}"
        if want != decl:
            return f"{decl[0]} {name} is declared differently"
    return ""


def _read_for_full(state: FamilyState, sk: Skeleton, result: FamilyResult,
                   trusted: bool) -> tuple[bool, str]:
    """A full sync's read: whether the table exists, and why it must be rebuilt."""
    if trusted and state.known:
        # nobody committed since svcproxy's last transaction: the table is what
        # the stores say, and listing it (35 s at 50,000 services) is skipped
        result.listed = False
        return True, ""
    exists = _read(state)
    return exists, _fixed_part_differs(state, sk) if exists else ""


#: service ports a full sync renders, compares and turns into statements at
#: a time: one chunk's rules are freed before the next is rendered, so the
#: text of every chain never exists at once and what the sync keeps is not
#: scattered over the memory that text used (as the iptables datapath's)
CHUNK = 256


class _FullWrite:
    """A full sync's transaction(s), built a chunk of chains and sets at a
    time; what it wants of the kernel collected for the stores."""

    def __init__(self, state: FamilyState, result: FamilyResult, exists: bool, why: str
                 ) -> None:
        self.state = state
        self.new = not exists or bool(why)
        self.tx = Transaction(state.kernel.prefix)
        # a new table is written in two transactions: first the fixed part
        # and every declaration, chains in order (nft -f), inert while its
        # maps are empty; then the service ports' rules and elements, all at
        # once (over netlink: nft's own parsing was half of the time)
        self.body = Transaction(state.kernel.prefix) if self.new and not why else self.tx
        self.chains: dict[str, ChainState] = {}
        self.sets: dict[str, SetDecl] = {}
        self.elements: dict[ElementKey, str] = {}
        self.written = 0
        if why:
            log.warning("nftables table %s rebuilt in one transaction: %s",
                        state.kernel.prefix, why)
            self.tx.head.append(f"add table {state.kernel.prefix}")
            self.tx.head.append(f"delete table {state.kernel.prefix}")
            result.rebuilt = True
        if self.new:
            self.tx.add_table()

    def add(self, chains: Mapping[str, Chain], sets: Mapping[str, SetDecl]) -> None:
        """One chunk: its chains and sets are compared now (written if they
        differ from the store), their statements joined."""
        want = {name: stored(chain) for name, chain in chains.items()}
        self.chains.update(want)
        self.sets.update(sets)
        tx = self.tx
        if self.new:
            for name, decl in sets.items():
                tx.add_set(name, decl)
            for name, chain in chains.items():
                if self.body is tx or _declares(name):
                    tx.write_chain(name, chain, exists=False)
                else:
                    tx.write_chain(name, (chain[0], ()), exists=False)
                    self.body.add_rules(name, chain[1])
            self.written += len(chains)
        else:
            self.written += _emit(self.state, tx, diff_items(self.state.chains.have, want, want),
                                  chains, diff_items(self.state.sets.have, sets, sets))
        tx.cut()
        self.body.cut()


def _write_full(state: FamilyState, plan: ServiceMap, opts: NftOptions, sk: Skeleton,
                result: FamilyResult, exists: bool, why: str) -> dict[SPKey, KeptBlock]:
    """The table as `plan` wants it, rendered and compared a chunk at a time
    (a new or rebuilt table written whole); returns the blocks to keep."""
    w = _FullWrite(state, result, exists, why)
    blocks: dict[SPKey, KeptBlock] = {}
    with phase("render"):
        w.add(sk.chains, sk.sets)
        w.elements.update(sk.elements)
        groups = port_groups(plan, None, opts.family)
        keys = sorted(groups)
        for start in range(0, len(keys), CHUNK):
            chains: dict[str, Chain] = {}
            sets: dict[str, SetDecl] = {}
            for key in keys[start:start + CHUNK]:
                block = service_port_block(groups.pop(key), opts)
                chains.update(block.chains)
                sets.update((name, ("set", decl)) for name, decl in block.sets.items())
                w.elements.update(block.elements)
                blocks[key] = kept(block)
            w.add(chains, sets)
    if w.new:
        w.body.elements(w.elements, ())
        _commit(state, w.tx, None if w.body is w.tx else w.body)
        result.transactions += 1 + (w.body is not w.tx)
        state.chains.load(w.chains)
        state.sets.load(w.sets)
        state.elements.load(w.elements)
        state.stale.clear()
        result.chains_written = len(w.chains)
        result.sets = len(w.sets)
        result.elements = len(w.elements)
        return blocks
    chains_diff = state.chains.diff(w.chains)
    # chains no longer wanted: flushed now, deleted later (base chains of
    # another layout reference nothing and go at once)
    for name in list(chains_diff.deleted):
        if name in state.stale:
            del chains_diff.deleted[name]
    sets_diff = state.sets.diff(w.sets)
    result.chains_written += w.written
    _finish(state, w.tx, chains_diff, sets_diff, state.elements.diff(w.elements), result)
    return blocks


def _declares(chain: str) -> bool:
    """Whether a new table's first transaction writes this chain's rules: the
    fixed chains, and firewall chains (their anonymous sets of source ranges
    are for nft to write; no packet reaches them before the second)."""
    return not is_service_chain(chain) or chain.startswith(FIREWALL_PREFIX)


def _partial(state: FamilyState, touched: set[SPKey], fresh: Mapping[SPKey, ServicePortBlock],
             result: FamilyResult) -> None:
    want_chains: dict[str, Chain] = {}
    want_sets: dict[str, SetDecl] = {}
    want_elements: dict[ElementKey, str] = {}
    chain_scope: set[str] = set()
    set_scope: set[str] = set()
    element_scope: set[ElementKey] = set()
    users = state.shared_users
    for key in touched:
        old, new = state.blocks.get(key), fresh.get(key)
        for element in _shared(old):
            users[element] = users.get(element, 0) - 1
        for element in _shared(new):
            users[element] = users.get(element, 0) + 1
        if old is not None:
            chain_scope.update(old.names)
        if new is not None:
            chain_scope.update(new.chains)
        for block in (old, new):
            if block is not None:
                set_scope.update(block.sets)
                element_scope.update(block.elements)
        if new is not None:
            want_chains.update(new.chains)
            want_sets.update((n, ("set", d)) for n, d in new.sets.items())
            want_elements.update(new.elements)
    for element in list(element_scope):
        if element[0] in SHARED_SETS:
            if users.get(element, 0) > 0:
                want_elements[element] = ""
            else:
                users.pop(element, None)
    tx = Transaction(state.kernel.prefix)
    chains = state.chains.diff({n: stored(c) for n, c in want_chains.items()}, chain_scope)
    _apply(state, tx, chains, want_chains, state.sets.diff(want_sets, set_scope),
           state.elements.diff(want_elements, element_scope), result)


def _rewrite_users(state: FamilyState, chains: Diff[str, ChainState],
                   rendered: Mapping[str, Chain], sets: Diff[str, SetDecl]) -> None:
    """A set declared differently is deleted and added again: every chain that
    names it is rewritten in the same transaction, so nothing refers to it.
    (Only a service port's affinity sets are ever redeclared without a
    rebuild, and only its own chains name them: they are in `rendered`.)"""
    names = {f"@{n}" for n in sets.updated}
    if not names:
        return
    for name, chain in rendered.items():
        have = state.chains.get(name)
        if have is not None and name not in chains.created and name not in chains.updated \
                and any(any(n in rule for n in names) for rule in chain[1]):
            chains.updated[name] = (have, have)


def _apply(state: FamilyState, tx: Transaction, chains: Diff[str, ChainState],
           rendered: Mapping[str, Chain], sets: Diff[str, SetDecl],
           elements: Diff[ElementKey, str], result: FamilyResult) -> None:
    """Write the differences; `rendered`: the chains compared, with their
    rules (the store has their digests only)."""
    result.chains_written += _emit(state, tx, chains, rendered, sets)
    _finish(state, tx, chains, sets, elements, result)


def _emit(state: FamilyState, tx: Transaction, chains: Diff[str, ChainState],
          rendered: Mapping[str, Chain], sets: Diff[str, SetDecl]) -> int:
    """The statements for the chains and sets created or updated (and the
    chains naming a redeclared set); how many chains they write."""
    _rewrite_users(state, chains, rendered, sets)
    for name, decl in sets.created.items():
        tx.add_set(name, decl)
    for name in chains.created:
        tx.write_chain(name, rendered[name], exists=False)
        state.stale.pop(name, None)
    for name in chains.updated:
        tx.write_chain(name, rendered[name], exists=True)
        state.stale.pop(name, None)
    for name, (old, new) in sets.updated.items():
        tx.delete_set(name, old[0])
        tx.add_set(name, new, late=True)
    return len(chains.created) + len(chains.updated)


def _finish(state: FamilyState, tx: Transaction, chains: Diff[str, ChainState],
            sets: Diff[str, SetDecl], elements: Diff[ElementKey, str],
            result: FamilyResult) -> None:
    """The deletions and the elements, the commit, and the stores updated."""
    now = state.clock()
    base_names = {b.name for b in BASE_CHAINS}
    flushed: list[str] = []
    for name, (_, rules) in chains.deleted.items():
        if name in base_names:
            tx.delete_chain(name)
        elif rule_count(rules):
            tx.flush_chain(name)
            flushed.append(name)
        else:
            flushed.append(name)
    for name, decl in sets.deleted.items():
        tx.delete_set(name, decl[0])
    adds = {**elements.created, **{k: new for k, (_, new) in elements.updated.items()}}
    tx.elements(adds, [*elements.updated, *elements.deleted])
    if tx:
        _commit(state, tx)
        result.transactions += 1
    state.chains.applied(chains)
    for name in flushed:
        state.chains.set(name, stored(((), _NO_RULES)))
        state.stale.setdefault(name, now)
    for name in chains.deleted:
        if name in base_names:
            state.chains.set(name, None)
    state.sets.applied(sets)
    state.elements.applied(elements)
    result.chains_flushed += len(flushed)
    result.sets += len(sets)
    result.elements += len(elements)


def _commit(state: FamilyState, tx: Transaction, then: Transaction | None = None) -> None:
    """Commit `tx` (and, as a second transaction, `then`)."""
    with phase("transaction"):
        try:
            if then is None:
                state.kernel.run(tx.text())
            else:
                state.kernel.run_two(tx.text(), then.text())
        except Exception:
            state.forget()  # all or nothing, but say so to the next sync: read back
            raise


def cleanup_family(kernel: NftKernel) -> list[str]:
    """Delete the table (svcproxy's, or kube-proxy nftables mode's: the same)."""
    if kernel.delete_table():
        return [f"nftables: deleted table {kernel.prefix}"]
    return []


def retire_nftables(netns: str | None = None) -> list[str]:
    """Another datapath serves now: delete the nftables datapath's tables (or
    kube-proxy nftables mode's) where they are. Established connections keep
    their conntrack NAT and never notice."""
    lines: list[str] = []
    for family in (4, 6):
        try:
            lines += cleanup_family(NftKernel(family, netns))
        except KernelError as exc:  # no nft, no nf_tables: nothing of ours either
            log.debug("nftables tables not checked: %s", exc)
    return lines
