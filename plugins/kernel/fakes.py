"""In-memory fakes of the kernel doors, for unit tests of the reconcilers.

They keep state as the kernel does and answer as it does where the
reconcilers care: adding what exists is EEXIST, deleting or updating what does
not is ESRCH/ENOENT, a batch applies the operations it can and reports the
others. Tests can make the fake refuse chosen operations (`refuse`), give
real servers connections (`connections`), and count what was written
(`writes`). The VM and host tiers check the real doors against the real
kernel; these check the logic on top, in milliseconds and without root.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from .ipset import IPSET_ERR_HASH_FULL, IpsetFailure, SetSpec
from .iptables import RestoreInput, input_lines, joined
from .ipvs import RealServer, VirtualServer
from .netlink import Failure
from .nftables import NftChain, NftSet, NftTable
from .tools import KernelError

VSKey = tuple[str, int, str]
RSKey = tuple[str, int]
#: (op, virtual server, real server or None) -> errno to refuse with, or None
Refusal = Callable[[str, VirtualServer, RealServer | None], int | None]


@dataclass
class FakeIpvs:
    """A namespace's IPVS table."""

    services_: dict[VSKey, VirtualServer] = field(default_factory=dict)
    dests_: dict[VSKey, dict[RSKey, RealServer]] = field(default_factory=dict)
    #: (active, inactive) connections of a real server
    connections: dict[tuple[VSKey, RSKey], tuple[int, int]] = field(default_factory=dict)
    refuse: Refusal | None = None
    #: every operation the kernel took, in order: (op, vs key, rs key or None)
    writes: list[tuple[str, VSKey, RSKey | None]] = field(default_factory=list)
    reads: int = 0

    # -- as ipvsadm would set things up (tests) --------------------------------------

    def add(self, vs: VirtualServer, *rss: RealServer) -> None:
        self.services_[vs.key] = vs
        self.dests_.setdefault(vs.key, {}).update({rs.key: rs for rs in rss})

    def table(self) -> dict[VSKey, dict[RSKey, int]]:
        """{virtual server: {real server: weight}}: what `ipvsadm -S -n` shows."""
        return {k: {rk: rs.weight for rk, rs in self.dests_.get(k, {}).items()}
                for k in self.services_}

    # -- the door ----------------------------------------------------------------

    def services(self, expect: Iterable[VSKey] = ()) -> list[VirtualServer]:
        self.reads += 1
        return list(self.services_.values())

    def get_services(self, keys: Sequence[VSKey]) -> list[VirtualServer]:
        self.reads += 1
        return [self.services_[k] for k in keys if k in self.services_]

    def _with_counters(self, key: VSKey, rs: RealServer) -> RealServer:
        active, inactive = self.connections.get((key, rs.key), (0, 0))
        return replace(rs, active=active, inactive=inactive)

    def dests(self, vs: VirtualServer) -> list[RealServer]:
        self.reads += 1
        if vs.key not in self.services_:
            raise OSError(errno.ESRCH, f"no virtual server {vs}")
        return [self._with_counters(vs.key, rs) for rs in self.dests_.get(vs.key, {}).values()]

    def dests_of(self, services: Sequence[VirtualServer]) -> dict[VSKey, list[RealServer]]:
        return {vs.key: self.dests(vs) for vs in services}

    def batch(self) -> FakeBatch:
        return FakeBatch(self)

    def apply(self, op: str, vs: VirtualServer, rs: RealServer | None) -> int:
        """One operation; 0 or the errno the kernel would answer."""
        if self.refuse is not None:
            code = self.refuse(op, vs, rs)
            if code:
                return code
        key = vs.key
        exists = key in self.services_
        if op == "add service":
            if exists:
                return errno.EEXIST
            self.services_[key], self.dests_[key] = vs, {}
        elif not exists:
            return errno.ESRCH
        elif op == "update service":
            self.services_[key] = vs
        elif op == "delete service":
            del self.services_[key]
            self.dests_.pop(key, None)
        else:
            code = self._apply_dest(op, key, rs)
            if code:
                return code
        self.writes.append((op, key, rs.key if rs is not None else None))
        return 0

    def _apply_dest(self, op: str, key: VSKey, rs: RealServer | None) -> int:
        assert rs is not None
        dests = self.dests_.setdefault(key, {})
        if op == "add real server":
            if rs.key in dests:
                return errno.EEXIST
            dests[rs.key] = rs
        elif rs.key not in dests:
            return errno.ENOENT
        elif op == "update real server":
            dests[rs.key] = rs
        else:
            del dests[rs.key]
            self.connections.pop((key, rs.key), None)
        return 0


@dataclass
class FakeBatch:
    ipvs: FakeIpvs
    ops: list[tuple[str, VirtualServer, RealServer | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ops)

    def add_service(self, vs: VirtualServer) -> None:
        self.ops.append(("add service", vs, None))

    def update_service(self, vs: VirtualServer) -> None:
        self.ops.append(("update service", vs, None))

    def delete_service(self, vs: VirtualServer) -> None:
        self.ops.append(("delete service", vs, None))

    def add_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append(("add real server", vs, rs))

    def update_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append(("update real server", vs, rs))

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self.ops.append(("delete real server", vs, rs))

    def commit(self) -> list[Failure]:
        failures = []
        for op, vs, rs in self.ops:
            code = self.ipvs.apply(op, vs, rs)
            if code:
                target = str(vs) if rs is None else f"{vs} -> {rs.address}:{rs.port}"
                failures.append(Failure(op, target, code, (vs.address, vs.port, vs.protocol)))
        self.ops = []
        return failures


@dataclass
class FakeLink:
    """kube-ipvs0 and the node's other addresses."""

    exists: bool = False
    bound: set[str] = field(default_factory=set)
    #: the node's own addresses, on other links
    node_addresses: list[str] = field(default_factory=list)
    #: addresses the kernel refuses to add
    refuse: set[str] = field(default_factory=set)
    changes: list[tuple[str, str]] = field(default_factory=list)  # ("add"|"del", address)

    INDEX = 7

    def index(self, create: bool = True) -> int | None:
        if not self.exists and create:
            self.exists = True
        return self.INDEX if self.exists else None

    def addresses(self) -> set[str]:
        return set(self.bound) if self.exists else set()

    def other_addresses(self) -> set[str]:
        return set(self.node_addresses)

    def start_changes(self, add: Sequence[str], remove: Sequence[str]
                      ) -> tuple[list[str], list[str]] | None:
        if add:
            self.index()
        elif not remove or not self.exists:
            return None
        return list(add), list(remove)

    def finish_changes(self, changes: tuple[list[str], list[str]] | None) -> list[str]:
        if changes is None:
            return []
        out = []
        add, remove = changes
        for address in add:
            if address in self.refuse:
                out.append(f"add address {address} on kube-ipvs0: refused")
                continue
            self.bound.add(address)
            self.changes.append(("add", address))
        for address in remove:
            self.bound.discard(address)
            self.changes.append(("del", address))
        return out

    def delete(self) -> bool:
        existed, self.exists = self.exists, False
        self.bound.clear()
        return existed


@dataclass
class FakeConntrack:
    deleted: list[tuple[tuple[str, ...], int]] = field(default_factory=list)

    def delete(self, args: Sequence[str], family: int = 4) -> int:
        self.deleted.append((tuple(args), family))
        return 1


@dataclass
class FakeIpvsKernel:
    """The IPVS datapath's doors (IpvsKernel's shape), all fakes."""

    nl: FakeIpvs = field(default_factory=FakeIpvs)
    link: FakeLink = field(default_factory=FakeLink)
    conntrack: FakeConntrack = field(default_factory=FakeConntrack)
    netns: str | None = None


@dataclass
class FakeIpset:
    """The ipsets of one namespace: {name: members in kube-proxy's text}."""

    sets: dict[str, set[str]] = field(default_factory=dict)
    #: (set, member) pairs the kernel refuses to add (a set at maxelem, say)
    refuse: set[tuple[str, str]] = field(default_factory=set)
    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (op, set, member)
    #: sets a rule outside svcproxy's uses: destroying them is refused
    referenced: set[str] = field(default_factory=set)
    created: list[SetSpec] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)

    def read(self, wanted: Callable[[str], bool]) -> dict[str, set[str]]:
        return {name: set(members) for name, members in self.sets.items() if wanted(name)}

    def write(self, adds: Sequence[tuple[str, str]], dels: Sequence[tuple[str, str]],
              family: int) -> list[IpsetFailure]:
        failures = []
        for op, pairs in (("add", adds), ("del", dels)):
            for name, member in pairs:
                if name not in self.sets:
                    failures.append(IpsetFailure(op, name, member, errno.ENOENT))
                elif op == "add" and (name, member) in self.refuse:
                    failures.append(IpsetFailure(op, name, member, IPSET_ERR_HASH_FULL))
                else:
                    (self.sets[name].add if op == "add" else self.sets[name].discard)(member)
                    self.writes.append((op, name, member))
        return failures

    def create(self, specs: Sequence[SetSpec]) -> None:
        for spec in specs:
            self.sets.setdefault(spec.name, set())
            self.created.append(spec)

    def prepare(self, types: Iterable[str]) -> None:
        self.prepared.extend(types)

    def destroy(self, names: Iterable[str]) -> dict[str, int]:
        """As the kernel: a set in `self.referenced` (a rule uses it) stays."""
        refused = {}
        for name in names:
            if name in self.referenced:
                refused[name] = 4100  # IPSET_ERR_BUSY, as the kernel answers
            else:
                self.sets.pop(name, None)
        return refused


BUILTIN_CHAINS: dict[tuple[str, str], tuple[str, ...]] = {
    **{("nat", c): () for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")},
    **{("filter", c): () for c in ("INPUT", "FORWARD", "OUTPUT")}}


@dataclass
class FakeIptables:
    """One family's iptables: {(table, chain): rules}, with iptables-restore
    --noflush semantics for the input svcproxy writes."""

    chains: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=lambda: dict(
        BUILTIN_CHAINS))
    restores: int = 0
    fail_next: str | None = None

    #: conntrack deletions asked for (the iptables datapath's door has them)
    conntrack: list[list[str]] = field(default_factory=list)
    #: inputs given to check_restore (committed nowhere)
    checked: list[str] = field(default_factory=list)

    def save_all(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return dict(self.chains)

    def save(self, table: str) -> dict[str, tuple[str, ...]]:
        return {c: r for (t, c), r in self.chains.items() if t == table}

    def conntrack_delete(self, args: list[str]) -> int:
        self.conntrack.append(list(args))
        return 0

    def check_restore(self, text: RestoreInput) -> None:
        self.checked.append(joined(text))

    def restore(self, text: RestoreInput) -> None:
        self.restores += 1
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise OSError(message)
        chains = dict(self.chains)
        table = ""
        for line in input_lines(text):
            table = self._apply_line(chains, table, line)
        self.chains = chains

    @staticmethod
    def _apply_line(chains: dict[tuple[str, str], tuple[str, ...]], table: str,
                    line: str) -> str:
        if line.startswith("*"):
            return line[1:]
        if line.startswith(":"):
            chains[(table, line[1:].split()[0])] = ()
        elif line.startswith("-A "):
            name = line.split()[1]
            chains[(table, name)] = (*chains[(table, name)], line)
        elif line.startswith("-I "):
            _, name, _, body = line.split(" ", 3)
            chains[(table, name)] = (f"-A {name} {body}", *chains[(table, name)])
        elif line.startswith("-D "):
            _, name, body = line.split(" ", 2)
            rules = list(chains[(table, name)])
            rules.remove(f"-A {name} {body}")
            chains[(table, name)] = tuple(rules)
        elif line.startswith("-X "):
            del chains[(table, line.split()[1])]
        return table


class FakeNft:
    """One nftables table in memory, with NftKernel's shape. It reads the
    statements the nftables datapath writes (add/delete/flush of table, set,
    map, chain, rule, element) and checks them as the kernel does where it
    matters: a transaction is all or nothing; a rule or element may only name
    chains and sets that exist; a chain or set still named by a rule or an
    element cannot be deleted; an element that exists cannot be added with
    another value, one that does not cannot be deleted. `refuse` makes the
    next transaction that contains the given text fail."""

    def __init__(self, family: int = 4, table: str = "kube-proxy") -> None:
        from .nftables import family_word

        self.family = family
        self.word = family_word(family)
        self.table_name = table
        self.prefix = f"{self.word} {table}"
        self.table: NftTable | None = None
        self.transactions = 0
        self.texts: list[str] = []
        self.lists = 0
        self.refuse: str | None = None
        self.conntrack: list[list[str]] = []
        #: the namespace's ruleset generation: every commit, anybody's, adds one
        self.gen = 1

    def run(self, text: str) -> None:
        import copy

        if self.refuse is not None and self.refuse in text:
            raise KernelError(f"nft -f (table {self.prefix}) failed: refused ({self.refuse})")
        work = copy.deepcopy(self.table)
        for number, stmt in enumerate(text.splitlines(), 1):
            if stmt:
                try:
                    work = self._apply(work, stmt)
                except ValueError as exc:
                    raise KernelError(f"nft -f (table {self.prefix}) failed: {exc} "
                                      f"(line {number}: {stmt})") from None
        if work is not None:
            self._check_references(work)
        self.table = work
        self.transactions += 1
        self.texts.append(text)
        self.gen += 1

    def generation(self) -> int | None:
        return self.gen

    def run_two(self, first: str, second: str) -> None:
        """(NftKernel's: two transactions, one after the other)"""
        self.run(first)
        self.run(second)

    def close(self) -> None:
        """(NftKernel closes its netlink socket)"""

    def _apply(self, table: NftTable | None, stmt: str) -> NftTable | None:
        verb, kind, rest = stmt.split(" ", 2)
        if not rest.startswith(self.prefix):
            raise ValueError(f"not this table: {stmt}")
        rest = rest[len(self.prefix):].strip()
        if kind == "table":
            if verb == "add":
                return table if table is not None else NftTable(comment=_inner(rest))
            if table is None:
                raise ValueError("No such file or directory")
            return None
        if table is None:
            raise ValueError("No such file or directory (no table)")
        name, _, body = rest.partition(" ")
        getattr(self, f"_{kind}")(table, verb, name, body)
        return table

    def _set(self, table: NftTable, verb: str, name: str, body: str, kind: str = "set") -> None:
        if verb == "add":
            header = tuple(p.strip() for p in body.strip().strip("{}").split(";") if p.strip())
            have = table.sets.get(name)
            if have is not None and (have.kind, have.header) != (kind, header):
                raise ValueError(f"File exists: {kind} {name} is declared differently")
            table.sets.setdefault(name, NftSet(kind, header))
        elif verb == "delete":
            if name not in table.sets:
                raise ValueError(f"No such file or directory: {kind} {name}")
            if any(f"@{name}" in r.replace("{", " ").replace("}", " ").split()
                   for c in table.chains.values() for r in c.rules):
                raise ValueError(f"Device or resource busy: {kind} {name} is in use")
            del table.sets[name]

    def _map(self, table: NftTable, verb: str, name: str, body: str) -> None:
        self._set(table, verb, name, body, "map")

    def _chain(self, table: NftTable, verb: str, name: str, body: str) -> None:
        if verb == "add":
            if name not in table.chains:
                table.chains[name] = NftChain(_chain_header(body), ())
        elif verb == "flush":
            chain = self._need_chain(table, name)
            table.chains[name] = NftChain(chain.header, ())
        elif verb == "delete":
            chain = self._need_chain(table, name)
            if chain.rules or self._referenced(table, name):
                raise ValueError(f"Device or resource busy: chain {name}")
            del table.chains[name]

    def _rule(self, table: NftTable, verb: str, name: str, body: str) -> None:
        chain = self._need_chain(table, name)
        table.chains[name] = NftChain(chain.header, (*chain.rules, body))

    def _element(self, table: NftTable, verb: str, name: str, body: str) -> None:
        from .nftables import parse_element, split_elements

        target = table.sets.get(name)
        if target is None:
            raise ValueError(f"No such file or directory: set {name}")
        for item in split_elements(body.strip().removeprefix("{").removesuffix("}")):
            key, value = parse_element(item)
            if verb == "add":
                if key in target.elements and target.elements[key] != value:
                    raise ValueError(f"File exists: {name} element {key}")
                target.elements[key] = value
            else:
                if key not in target.elements:
                    raise ValueError(f"No such file or directory: {name} element {key}")
                del target.elements[key]

    @staticmethod
    def _need_chain(table: NftTable, name: str) -> NftChain:
        chain = table.chains.get(name)
        if chain is None:
            raise ValueError(f"No such file or directory: chain {name}")
        return chain

    @staticmethod
    def _targets(text: str) -> list[str]:
        words = text.split()
        return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("goto", "jump")]

    def _referenced(self, table: NftTable, name: str) -> bool:
        return any(name in self._targets(r) for c in table.chains.values() for r in c.rules) \
            or any(name in self._targets(v) for s in table.sets.values()
                   for v in s.elements.values())

    def _check_references(self, table: NftTable) -> None:
        texts = [r for c in table.chains.values() for r in c.rules] + \
            [v for s in table.sets.values() for v in s.elements.values()]
        for text in texts:
            for target in self._targets(text):
                if target not in table.chains:
                    raise KernelError(f"nft -f failed: No such file or directory: chain "
                                      f"{target} (named by: {text})")
            for word in text.replace("{", " ").split():
                if word.startswith("@") and word[1:] not in table.sets:
                    raise KernelError(f"nft -f failed: No such file or directory: set "
                                      f"{word[1:]} (named by: {text})")

    def list_table(self, zero_counters: bool = True) -> NftTable | None:
        import copy

        self.lists += 1
        return copy.deepcopy(self.table)

    def delete_table(self) -> bool:
        existed = self.table is not None
        self.table = None
        return existed

    def available(self) -> str | None:
        return None

    def conntrack_delete(self, args: Sequence[str]) -> int:
        self.conntrack.append(list(args))
        return 1


def _inner(text: str) -> str:
    m = re.search(r'comment "([^"]*)"', text)
    return m.group(1) if m else ""


def _chain_header(body: str) -> tuple[str, ...]:
    """`{ type nat hook prerouting priority -100 ; }` -> the line nft prints."""
    from svcproxy.plugins.nftables.rules import BASE_CHAINS

    body = body.strip().strip("{}").strip()
    if not body:
        return ()
    m = re.match(r"type (\w+) hook (\w+) priority (-?\d+)", body)
    if m:
        for b in BASE_CHAINS:
            if (b.type, b.hook, b.priority) == (m[1], m[2], int(m[3])):
                return (b.header(),)
        return (f"type {m[1]} hook {m[2]} priority {m[3]}; policy accept;",)
    return tuple(p.strip() for p in body.split(";") if p.strip())
