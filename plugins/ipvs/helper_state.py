"""Reconciling kube-proxy IPVS mode's helper ipsets and iptables rules (one IP
family each) with the plan, by diff.

Two diff stores: set members, keyed (set, member), and svcproxy's chains,
keyed (table, chain). The members' desired state is counted per frontend
(SetIndex), so a partial sync compares only the members the changed frontends
gave up or took — the net difference, never a member that stays — and a full
sync compares every member with an ipset dump. The chains are rendered from
which sets are empty (helpers.helper_chains) and compared whole: there are
eleven of them.

The doors are `IpsetDoor` and `IptablesDoor` (svcproxy.plugins.kernel.doors),
so unit tests run this against the fakes; tests/host runs it against the host
kernel's ipset and iptables.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from svcproxy.diffstore import Diff, DiffStore
from svcproxy.ir import FrontendKey, ServiceMap
from svcproxy.phases import phase
from svcproxy.plugins.kernel.doors import IpsetDoor, IptablesDoor
from svcproxy.plugins.kernel.ipset import IpsetFailure
from svcproxy.plugins.kernel.iptables import ChainKey, restore_text

from .helpers import (
    JUMPS,
    SETS,
    HelperOptions,
    SetIndex,
    frontend_entries,
    helper_chains,
    iptables_mode_leftovers,
    is_owned,
    net_changes,
    set_name,
    set_specs,
    vip_source_rule,
)

Member = tuple[str, str]  # (set name as in the kernel, member text)
NodeIP = ipaddress.IPv4Address | ipaddress.IPv6Address | None
HEALTH = "KUBE-HEALTH-CHECK-NODE-PORT"


class HelperState:
    def __init__(self, ipset: IpsetDoor, ipt: IptablesDoor, family: int) -> None:
        self.ipset = ipset
        self.ipt = ipt
        self.family = family
        self.names = {base: set_name(base, family) for base in SETS}
        self.members: DiffStore[Member, bool] = DiffStore()
        self.chains: DiffStore[ChainKey, tuple[str, ...]] = DiffStore()
        #: members per set, kept with the store (the rules depend on which sets
        #: are empty; counting 20,000 members per partial sync would not be O(change))
        self.sizes: Counter[str] = Counter()
        self.existing: set[str] = set()
        self.builtin: dict[ChainKey, tuple[str, ...]] = {}
        self.index = SetIndex()
        #: the Service of each frontend, and each Service's health check node port
        self.service_of: dict[FrontendKey, str] = {}
        self.health_port: dict[str, str] = {}
        self.opts: HelperOptions | None = None
        #: early() read the kernel and nothing else wrote since
        self.just_read = False
        #: what the kernel refused in the last sync, each naming the Services it
        #: concerns; the rest of the sync was written (the datapath reports it)
        self.refused: list[str] = []

    @property
    def sets(self) -> dict[str, set[str]]:
        """What the sets hold as far as svcproxy knows (tests, status)."""
        out: dict[str, set[str]] = {name: set() for name in self.existing}
        for name, member in self.members.have:
            out.setdefault(name, set()).add(member)
        return out

    # -- reading ---------------------------------------------------------------------

    def read(self) -> None:
        """One iptables-save for both tables and, meanwhile, one ipset dump."""
        ours = set(self.names.values())
        with ThreadPoolExecutor(max_workers=1) as pool:
            saving = pool.submit(self.ipt.save_all)
            found = self.ipset.read(ours.__contains__)
            chains = saving.result()
        self.existing = set(found) & ours
        self.members.load({(name, m): True for name, members in found.items()
                           for m in members})
        self.sizes = Counter({name: len(members) for name, members in found.items()})
        self.chains.load({k: v for k, v in chains.items() if is_owned(*k)})
        self.builtin = {k: v for k, v in chains.items() if not is_owned(*k)}

    def _missing_jumps(self) -> list[tuple[str, str, str]]:
        return [(t, c, b) for t, c, b in JUMPS if f"-A {c} {b}" not in self.builtin.get((t, c), ())]

    # -- before the first sync ------------------------------------------------------------

    def warm_up(self) -> None:
        """While the initial lists load: have the kernel load what the helper
        rules' first restore would wait for — each helper set type, and the
        matches and targets of the helper chains (an `iptables-restore --test`
        of their shape, set matches left out: the sets may not exist yet).
        Nothing is written. In the emulated VM the first restore took 2.5 s,
        nearly all of it module loading; the next one 0.2 s."""
        self.ipset.prepare(sorted({kind for kind, _ in SETS.values()}))
        chains = helper_chains({}, [], HelperOptions(family=self.family))
        shapes = {k: tuple(r for r in rules if "--match-set" not in r)
                  for k, rules in chains.items()}
        self.ipt.check_restore(restore_text(shapes, [], JUMPS))

    def early(self, bound: Iterable[str], opts: HelperOptions, write_rule: bool = True) -> int:
        """Before the first sync: addresses already on kube-ipvs0 (a previous run,
        or kube-proxy's) are in KUBE-IPVS-IPS and node traffic from them is
        masqueraded, so the node keeps reaching the API server through its VIP
        while a long first sync runs. Returns the number of changes it wrote
        (set members, chains and jumps; set creation aside, as in sync).
        `write_rule` False: the masquerade rule is left to the sync_first that
        follows at once (a cold start), whose one restore writes it with the
        other helper chains, before any new address is bound."""
        self.read()
        fam = self.family
        name = self.names["KUBE-IPVS-IPS"]
        wanted = {(name, a): True for a in bound if (":" in a) == (fam == 6)}
        diff = self.members.diff(wanted, wanted)
        wrote = 0
        if name not in self.existing:
            self._create([name])
        if diff.created:
            self._write(diff)
            wrote += len(diff.created)
        key = ("nat", "KUBE-POSTROUTING")
        have = self.chains.get(key)
        first = vip_source_rule(fam)
        jumps = [j for j in self._missing_jumps() if j[1] == "POSTROUTING"]
        if write_rule and (have is None or first not in have or jumps):
            rules = (first, *(r for r in have or () if r != first))
            self.ipt.restore(restore_text({key: rules}, [], jumps))
            self.chains.set(key, rules)
            for t, c, b in jumps:
                self.builtin[(t, c)] = (*self.builtin.get((t, c), ()), f"-A {c} {b}")
            wrote += 1 + len(jumps)
        self.just_read = True
        return wrote

    # -- sync ------------------------------------------------------------------------

    def sync(self, plan: ServiceMap, changed: Iterable[FrontendKey] | None,
             opts: HelperOptions) -> int:
        """Write what differs (`changed` None: full sync); returns the number of
        set members and chains written."""
        full = (changed is None or not self.members.known or not self.chains.known
                or opts != self.opts)
        if full and not self.just_read:  # early() read the kernel moments ago
            with phase("read"):
                self.read()
        self.just_read = False
        self.opts = opts
        self.refused = []
        with phase("sets"):
            if full or changed is None:
                diff = self._members_full(plan, opts)
            else:
                diff = self._members_partial(plan, list(changed), opts)
        return self._write_all(diff, plan, opts, self._missing_jumps() if full else [])

    def _write_all(self, diff: Diff[Member, bool], plan: ServiceMap, opts: HelperOptions,
                   jumps: list[tuple[str, str, str]]) -> int:
        """Missing sets, the members, then the chains; the number of changes."""
        with phase("ipset"):
            missing = [n for n in self.names.values() if n not in self.existing]
            if missing:
                self._create(missing)
            if diff:
                diff = self._write(diff, plan)
        with phase("rules"):
            written = self._write_chains(opts, jumps)
        return len(diff) + written

    def sync_first(self, plan: ServiceMap, opts: HelperOptions) -> int:
        """A cold start's first write: the members `plan`'s frontends need are
        added (after reading the kernel, unless early() just did), the helper
        chains written where the kernel lacks them or they need a set that was
        empty; nothing else is removed. The full sync that follows reads no
        more: the store holds the kernel as written."""
        if not self.just_read:
            with phase("read"):
                self.read()
        self.refused = []
        with phase("sets"):
            diff = self._members_partial(plan, list(plan.frontends), opts)
        changes = self._write_all(diff, plan, opts, self._missing_jumps())
        self.opts = opts
        self.just_read = True
        return changes

    def _entries(self, plan: ServiceMap, fk: FrontendKey, node: NodeIP
                 ) -> tuple[tuple[tuple[str, str], ...], tuple[str, str, int] | None]:
        fe = plan.frontends.get(fk)
        if fe is None:
            return (), None
        return frontend_entries(fe, node, fe.bind_address)

    def _node(self, opts: HelperOptions) -> NodeIP:
        return ipaddress.ip_address(opts.node_ip) if opts.node_ip else None

    def _members_full(self, plan: ServiceMap, opts: HelperOptions) -> Diff[Member, bool]:
        node = self._node(opts)
        fam = self.family
        self.index = SetIndex()
        sink: list[tuple[str, str]] = []
        for fe in plan.frontends.values():
            if fe.family == fam:
                self.index.set(fe.key, *self._entries(plan, fe.key, node), sink, sink)
        self.service_of = {fe.key: fe.service_key for fe in plan.frontends.values()}
        self.health_port = {k: str(s.health_check_node_port)
                            for k, s in plan.services.items() if s.health_check_node_port}
        names = self.names
        desired = {(names[base], m): True for base, m in self.index.refs}
        desired.update({(names[HEALTH], p): True for p in set(self.health_port.values())})
        return self.members.diff(desired)

    def _members_partial(self, plan: ServiceMap, changed: list[FrontendKey],
                         opts: HelperOptions) -> Diff[Member, bool]:
        node = self._node(opts)
        fam = self.family
        adds: list[tuple[str, str]] = []
        dels: list[tuple[str, str]] = []
        for fk in changed:
            if (":" in fk.address) == (fam == 6):
                self.index.set(fk, *self._entries(plan, fk, node), adds, dels)
        adds, dels = net_changes(adds, dels)
        health_add, health_del = self._health_ports(plan, changed)
        # the net changes: what is added is wanted, what is deleted is not
        names = self.names
        want = {(names[b], m): True for b, m in adds}
        want.update({(names[HEALTH], p): True for p in health_add})
        gone = [(names[b], m) for b, m in dels] + [(names[HEALTH], p) for p in health_del]
        return self.members.diff(want, [*want, *gone])

    def _health_ports(self, plan: ServiceMap, changed: Iterable[FrontendKey]
                      ) -> tuple[list[str], list[str]]:
        """KUBE-HEALTH-CHECK-NODE-PORT for the Services owning the changed
        frontends only (a port two Services share stays while one has it)."""
        touched: set[str] = set()
        for fk in changed:
            old = self.service_of.pop(fk, None)
            if old is not None:
                touched.add(old)
            fe = plan.frontends.get(fk)
            if fe is not None:
                self.service_of[fk] = fe.service_key
                touched.add(fe.service_key)
        before = set(self.health_port.values())
        for key in touched:
            summary = plan.services.get(key)
            if summary is not None and summary.health_check_node_port:
                self.health_port[key] = str(summary.health_check_node_port)
            else:
                self.health_port.pop(key, None)
        after = set(self.health_port.values())
        return sorted(after - before), sorted(before - after)

    # -- writing ---------------------------------------------------------------------

    def _create(self, names: list[str]) -> None:
        """Create sets (rare: the first sync), over netlink."""
        try:
            self.ipset.create(set_specs(names, self.family))
        except Exception:
            self.members.forget()
            raise
        self.existing.update(names)

    def _write(self, diff: Diff[Member, bool], plan: ServiceMap | None = None
               ) -> Diff[Member, bool]:
        """Members through batched netlink. What the kernel refuses is left out
        of the store (unknown: the next sync reads it back) and described in
        `refused`; the rest is recorded as written. Returns what was written."""
        failures = self.ipset.write(list(diff.created), list(diff.deleted), self.family)
        if failures:
            bad = {(f.set_name, f.member) for f in failures}
            diff = Diff({k: v for k, v in diff.created.items() if k not in bad}, diff.updated,
                        {k: v for k, v in diff.deleted.items() if k not in bad})
            self.members.forget(bad)
            self.refused.extend(self._describe(f, plan) for f in failures)
        self.members.applied(diff)
        for name, _ in diff.created:
            self.sizes[name] += 1
        for name, _ in diff.deleted:
            self.sizes[name] -= 1
        return diff

    def _describe(self, failure: IpsetFailure, plan: ServiceMap | None) -> str:
        """A refused member with the Services it is there for."""
        base = next((b for b, n in self.names.items() if n == failure.set_name), "")
        if base == HEALTH:
            owners = sorted(k for k, port in self.health_port.items() if port == failure.member)
        else:
            entry = (base, failure.member)
            keys = [fk for fk, entries in self.index.contrib.items() if entry in entries]
            frontends = plan.frontends if plan is not None else {}
            owners = sorted({frontends[k].service if k in frontends else str(k) for k in keys})
        shown = ", ".join(owners[:3]) + (f" and {len(owners) - 3} more" if len(owners) > 3
                                         else "")
        target = f" (Service {shown})" if owners else ""
        return (f"ipset {failure.set_name}: cannot {failure.op} {failure.member}{target}: "
                f"{failure.reason}")

    def _write_chains(self, opts: HelperOptions, jumps: list[tuple[str, str, str]]) -> int:
        sizes: Mapping[str, int] = self.sizes
        out_filter = sorted(set(self.index.out_filter.values()))
        desired = helper_chains(sizes, out_filter, opts)
        diff = self.chains.diff(desired)
        writes = {**diff.created, **{k: new for k, (_, new) in diff.updated.items()}}
        text = restore_text(writes, list(diff.deleted), jumps)
        if not text:
            return 0
        try:
            self.ipt.restore(text)
        except Exception:
            self.chains.forget()
            raise
        self.chains.applied(diff)
        for t, c, b in jumps:
            self.builtin[(t, c)] = (f"-A {c} {b}", *self.builtin.get((t, c), ()))
        return len(diff) + len(jumps)

    def remove_iptables_mode(self) -> int:
        """After the IPVS datapath serves: remove what kube-proxy's iptables mode
        (or svcproxy's iptables datapath) left that IPVS mode does not use, as
        found by the last full read. Its per-service chains are unreferenced
        once KUBE-SERVICES is IPVS mode's; its filter chains still hold
        rejects for services that had no endpoints. Established connections
        keep their conntrack entries. Returns the number of chains and jumps
        removed."""
        chains, jumps = iptables_mode_leftovers(self.builtin)
        if not chains and not jumps:
            return 0
        self.ipt.restore(restore_text({}, chains, unjumps=jumps))
        for key in chains:
            self.builtin.pop(key, None)
        for t, c, b in jumps:
            self.builtin[(t, c)] = tuple(r for r in self.builtin.get((t, c), ())
                                         if r != f"-A {c} {b}")
        return len(chains) + len(jumps)

    # -- cleanup ---------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        self.read()
        unjumps = [(t, c, b) for t, c, b in JUMPS
                   if f"-A {c} {b}" in self.builtin.get((t, c), ())]
        owned = list(self.chains.have)
        text = restore_text({}, owned, unjumps=unjumps)
        lines = []
        if text:
            self.ipt.restore(text)
            lines.append(f"ipvs: removed {len(unjumps)} jump rules and {len(owned)} "
                         f"chains (IPv{self.family})")
        ours = sorted(self.existing & set(self.names.values()))
        refused = self.ipset.destroy(ours) if ours else {}
        if len(ours) > len(refused):
            lines.append(f"ipvs: removed {len(ours) - len(refused)} ipsets (IPv{self.family})")
        for name, code in sorted(refused.items()):
            lines.append(f"ipvs: ipset {name} not removed: {IpsetFailure.describe(code)}")
        self.members.reset()
        self.chains.reset()
        return lines
