"""Reconciling the kernel's iptables rules with the plan, one IP family at a time.

The desired ruleset is assembled from per-service-port blocks (rules.py) plus
the config-only chains, and compared with a diff store of svcproxy's chains
(svcproxy.diffstore) — the same code for both kinds of sync, over different
keys:

- partial: only the service ports the delta touched are re-rendered, and only
  their chains (and a shared chain whose fragments changed) are compared;
- full: every chain is re-rendered and the store is loaded from
  `iptables-save` first, so rules changed or deleted behind svcproxy's back
  are repaired and stale chains removed.

Either way only chains that differ are written, in one `iptables-restore
--noflush` per table; nothing differing means nothing is written. A refused
restore changes nothing (iptables-restore is atomic per table) and makes the
store unknown: the next sync reads the kernel back.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from svcproxy.diffstore import DiffStore
from svcproxy.ir import Frontend, FrontendKey, ServiceMap
from svcproxy.phases import phase
from svcproxy.plugins.kernel.iptables import (
    BACKENDS,
    TABLES,
    IptablesKernel,
    RestoreBuilder,
    RestoreInput,
    legacy_tables_loaded,
    restore_text,
)
from svcproxy.plugins.kernel.tools import KernelError

from .rules import (
    FILTER_CHAINS,
    FIREWALL,
    JUMPS,
    LOCALNET_FILTER,
    LOCALNET_JUMPS,
    NAT_CHAINS,
    ChainKey,
    RuleOptions,
    ServicePortRules,
    is_owned,
    nodeports_jump,
    service_port_rules,
    static_chains,
)

log = logging.getLogger(__name__)

SPKey = tuple[str, str]  # (service port name, protocol)
#: the shared chains built from per-service-port fragments
SHARED: tuple[ChainKey, ...] = (("nat", "KUBE-SERVICES"), ("nat", "KUBE-NODEPORTS"),
                                ("filter", "KUBE-SERVICES"), ("filter", "KUBE-EXTERNAL-SERVICES"),
                                ("filter", "KUBE-NODEPORTS"), ("filter", "KUBE-PROXY-FIREWALL"))


def group(frontends: Iterable[Frontend]) -> dict[SPKey, list[Frontend]]:
    out: dict[SPKey, list[Frontend]] = {}
    for f in frontends:
        out.setdefault((f.service, f.protocol), []).append(f)
    for fs in out.values():
        fs.sort(key=lambda f: f.key)
    return out


def port_groups(plan: ServiceMap, keys: Iterable[SPKey] | None,
                family: int) -> dict[SPKey, list[Frontend]]:
    """The frontends of the given service ports (all of them when keys is
    None) in one family, by service port; `plan` may hold both families."""
    if keys is None:
        return group(f for f in plan.frontends.values() if f.family == family)
    wanted = set(keys)
    services = {k[0].split(":", 1)[0] for k in wanted}
    frontends = [f for s in services for fk in plan.by_service.get(s, ())
                 if (f := plan.frontends.get(fk)) is not None and f.family == family]
    return {k: v for k, v in group(frontends).items() if k in wanted}


def render_service_ports(plan: ServiceMap, keys: Iterable[SPKey] | None,
                         opts: RuleOptions) -> dict[SPKey, ServicePortRules]:
    """Rules for the given service ports (all of them when keys is None) in the
    family of `opts`; `plan` may hold both families."""
    return {key: _render(plan, fes, opts)
            for key, fes in port_groups(plan, keys, opts.family).items()}


def _render(plan: ServiceMap, frontends: list[Frontend], opts: RuleOptions) -> ServicePortRules:
    summary = plan.services.get(frontends[0].service_key)
    hc = summary.health_check_node_port if summary else 0
    return service_port_rules(frontends, hc, opts)


def assemble_shared(sp_rules: Mapping[SPKey, ServicePortRules | WrittenPort], chain: ChainKey,
                    opts: RuleOptions) -> tuple[str, ...]:
    lines: list[str] = []
    for key in sorted(sp_rules):
        lines.extend(sp_rules[key].fragment(chain))
    if chain == ("nat", "KUBE-SERVICES"):
        lines.extend(nodeports_jump(opts))
    return tuple(lines)


def config_chains(opts: RuleOptions) -> dict[ChainKey, tuple[str, ...]]:
    """The chains that do not depend on the Services, with their rules (the
    shared chains empty: their rules are the service ports' fragments)."""
    out: dict[ChainKey, tuple[str, ...]] = {}
    for name in NAT_CHAINS:
        out[("nat", name)] = ()
    for name in FILTER_CHAINS:
        out[("filter", name)] = ()
    out.update(static_chains(opts))
    return out


def desired_ruleset(sp_rules: Mapping[SPKey, ServicePortRules],
                    opts: RuleOptions) -> dict[ChainKey, tuple[str, ...]]:
    """Every chain svcproxy owns, with its rules."""
    out = config_chains(opts)
    for chain in SHARED:
        out[chain] = assemble_shared(sp_rules, chain, opts)
    for key in sorted(sp_rules):
        out.update(sp_rules[key].chains)
    return out


def jumps_for(opts: RuleOptions) -> tuple[tuple[str, str, str], ...]:
    """The jumps from built-in chains this family's rules need."""
    return (*JUMPS, *LOCALNET_JUMPS) if opts.localnet else JUMPS


def render_iptables_save(plan: ServiceMap, opts: RuleOptions) -> str:
    """What `svcproxy plan --output iptables-save` prints: svcproxy's chains as
    iptables-save shows them after a sync (chain order as iptables-save sorts)."""
    chains = desired_ruleset(render_service_ports(plan, None, opts), opts)
    out: list[str] = []
    for table in TABLES:
        names = sorted(c for t, c in chains if t == table)
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in names)
        jumps = [f"-A {c} {body}" for t, c, body in jumps_for(opts) if t == table]
        out.extend(jumps)
        for c in names:
            out.extend(chains[(table, c)])
        out.append("COMMIT")
    return "\n".join(out) + "\n"


#: a chain as the store remembers it: the hash of its rules and their number,
#: in one int (hash << 32 | count; a (count, hash) tuple cost 56 bytes more per
#: chain, 3 MB at 10,000 services). Not the text: at 10,000 services the text
#: of every chain, kept beside the rendering, was ~60 MB; the rendering is made
#: again when a chain is written
Digest = int
_COUNT = (1 << 32) - 1


def digest(rules: tuple[str, ...]) -> Digest:
    return (hash(rules) & 0xFFFF_FFFF_FFFF_FFFF) << 32 | min(len(rules), _COUNT)


def rule_count(d: Digest) -> int:
    """How many rules the chain a digest stands for holds."""
    return d & _COUNT


@dataclass
class FamilyState:
    kernel: IptablesKernel
    #: per service port, what was last applied successfully
    sp_rules: dict[SPKey, WrittenPort] = field(default_factory=dict)
    #: svcproxy's chains as the kernel holds them, as far as svcproxy knows
    chains: DiffStore[ChainKey, Digest] = field(default_factory=DiffStore)
    plan: ServiceMap = field(default_factory=ServiceMap)
    #: sync_first read the kernel (these are the chains it found that are not
    #: svcproxy's) and only it wrote since: the full sync after it reads no more
    just_read: dict[ChainKey, tuple[str, ...]] | None = None

    @property
    def written(self) -> dict[ChainKey, Digest] | None:
        """The chains svcproxy holds in the kernel (their digests); None
        until a full sync read them."""
        return self.chains.have if self.chains.known else None


@dataclass(frozen=True, slots=True)
class WrittenPort:
    """What the state keeps of a service port's rendering once its chains are
    written: their names, not their text (the digests are in the store), and
    its fragments of the shared chains as text, as tuples (a dict each, and
    a dict of chain names, cost ~400 bytes more per service port: 4 MB at
    10,000 services)."""

    names: tuple[ChainKey, ...]
    fragments: tuple[tuple[ChainKey, tuple[str, ...]], ...]
    udp_targets: tuple[tuple[str, int], ...]
    endpoints: frozenset[str]

    def fragment(self, chain: ChainKey) -> tuple[str, ...]:
        for key, rules in self.fragments:
            if key == chain:
                return rules
        return ()


def _kept(sp: ServicePortRules) -> WrittenPort:
    return WrittenPort(tuple(sp.chains), tuple(sp.fragments.items()), sp.udp_targets,
                       sp.endpoints)


@dataclass
class FamilyResult:
    written: list[ChainKey] = field(default_factory=list)
    deleted: list[ChainKey] = field(default_factory=list)
    jumps: int = 0
    conntrack_deleted: int = 0


def touched_ports(keys: Iterable[FrontendKey], *plans: ServiceMap) -> set[SPKey]:
    """Service ports owning the changed frontend keys (old or new)."""
    out: set[SPKey] = set()
    for k in keys:
        for plan in plans:
            f = plan.frontends.get(k)
            if f is not None:
                out.add((f.service, f.protocol))
    return out


def _read(state: FamilyState, desired: Container[ChainKey]
          ) -> tuple[dict[ChainKey, tuple[str, ...]], dict[ChainKey, tuple[str, ...]]]:
    """Load the store from iptables-save (one per table): svcproxy's chains, and
    any chain it wants that it shares with others (KUBE-FIREWALL: kubelet writes
    the same one; `desired` needs to hold only chains `is_owned` does not
    cover); returns the others, and the shared chains' text."""
    owned: dict[ChainKey, Digest] = {}
    builtin: dict[ChainKey, tuple[str, ...]] = {}
    shared: dict[ChainKey, tuple[str, ...]] = {}
    for table in TABLES:
        for name, rules in state.kernel.save(table).items():
            key = (table, name)
            if is_owned(table, name) or key in desired:
                owned[key] = digest(rules)
                if key in SHARED:
                    shared[key] = rules
            else:
                builtin[key] = rules
    state.chains.load(owned)
    return builtin, shared


def _partial_desired(state: FamilyState, plan: ServiceMap, changed: Iterable[FrontendKey],
                     opts: RuleOptions
                     ) -> tuple[dict[ChainKey, tuple[str, ...]], set[ChainKey],
                                dict[SPKey, WrittenPort]]:
    """The touched service ports' chains and the shared chains whose fragments
    changed; the chains to compare (those and the touched ports' old ones); the
    renderings to keep."""
    touched = touched_ports(changed, plan, state.plan)
    fresh = render_service_ports(plan, touched, opts)
    new_sp = dict(state.sp_rules)
    scope: set[ChainKey] = set()
    shared_dirty: set[ChainKey] = set()
    for key in touched:
        old = new_sp.pop(key, None)
        new = fresh.get(key)
        if old is not None:
            scope.update(old.names)
        if new is not None:
            new_sp[key] = _kept(new)
        for chain in SHARED:
            before = old.fragment(chain) if old else ()
            after = new.fragment(chain) if new else ()
            if before != after:
                shared_dirty.add(chain)
    desired = {c: r for n in fresh.values() for c, r in n.chains.items()}
    for chain in shared_dirty:
        desired[chain] = assemble_shared(new_sp, chain, opts)
    scope.update(desired)
    return desired, scope, new_sp


def sync_family(state: FamilyState, plan: ServiceMap, changed: Iterable[FrontendKey] | None,
                opts: RuleOptions) -> FamilyResult:
    """Bring the kernel rules of family `opts.family` to `plan` (which may hold
    both families). `changed` None = full sync."""
    result = FamilyResult()
    if changed is None or not state.chains.known:
        new_sp = _full_write(state, result, plan, opts)
    else:
        with phase("render"):
            desired, scope, new_sp = _partial_desired(state, plan, changed, opts)
        state.just_read = None
        _write(state, result, desired, scope, [])
    with phase("conntrack"):
        result.conntrack_deleted = clear_stale_udp(state.kernel, state.sp_rules, new_sp)
    state.sp_rules = new_sp
    state.plan = plan
    return result


#: service ports a full sync renders, compares and turns into restore input
#: at a time. One chunk's rules are freed before the next is rendered: the
#: text of every chain (~60 MB of small strings at 10,000 services) never
#: exists at once, and what the sync keeps is not scattered over the memory
#: that text used (Python gives memory back only in whole 1 MiB arenas: the
#: whole text rendered at once left ~30 MB resident for good)
CHUNK = 256


def _full_write(state: FamilyState, result: FamilyResult, plan: ServiceMap,
                opts: RuleOptions) -> dict[SPKey, WrittenPort]:
    """A full sync's render, read and write: the store is loaded from the
    kernel (unless sync_first just did), the service ports are rendered a
    chunk at a time, each chain compared by digest as it is made and only
    those that differ turned into restore input; then the shared and config
    chains, the deletions and the jumps, in one restore. Returns the
    renderings to keep."""
    config = config_chains(opts)
    with phase("read"):
        builtin = state.just_read
        if builtin is None:
            builtin = _read(state, {**config, **dict.fromkeys(SHARED)})[0]
    state.just_read = None
    jumps = [(t, c, body) for t, c, body in jumps_for(opts)
             if f"-A {c} {body}" not in builtin.get((t, c), ())]
    have = state.chains.have
    wanted: dict[ChainKey, Digest] = {}
    builder = RestoreBuilder()

    def want(chain: ChainKey, rules: tuple[str, ...]) -> None:
        d = wanted[chain] = digest(rules)
        if have.get(chain) != d:
            builder.write(chain, rules)

    new_sp: dict[SPKey, WrittenPort] = {}
    with phase("render"):
        groups = port_groups(plan, None, opts.family)
        keys = sorted(groups)
        for start in range(0, len(keys), CHUNK):
            for key in keys[start:start + CHUNK]:
                sp = _render(plan, groups.pop(key), opts)
                for chain, rules in sp.chains.items():
                    want(chain, rules)
                new_sp[key] = _kept(sp)
            builder.cut()
        for chain, rules in config.items():
            if chain not in SHARED:
                want(chain, rules)
        for chain in SHARED:
            want(chain, assemble_shared(new_sp, chain, opts))
        diff = state.chains.diff(wanted)
        parts = builder.parts(diff.deleted, jumps)
    _restore(state, parts)
    state.chains.applied(diff)
    result.written = sorted((*diff.created, *diff.updated))
    result.deleted = sorted(diff.deleted)
    result.jumps = len(jumps)
    return new_sp


def _restore(state: FamilyState, text: RestoreInput) -> None:
    if not text:
        return
    with phase("restore"):
        try:
            state.kernel.restore(text)
        except Exception:
            state.chains.forget()  # atomic per table, but which table failed?
            state.just_read = None
            raise


def _write(state: FamilyState, result: FamilyResult, desired: Mapping[ChainKey, tuple[str, ...]],
           scope: Iterable[ChainKey] | None, jumps: list[tuple[str, str, str]]) -> None:
    """One restore of the chains that differ from the store (by digest); the
    store follows what the kernel took."""
    diff = state.chains.diff({k: digest(v) for k, v in desired.items()}, scope)
    writes = {c: desired[c] for c in (*diff.created, *diff.updated)}
    _restore(state, restore_text(writes, list(diff.deleted), jumps))
    state.chains.applied(diff)
    result.written = sorted(writes)
    result.deleted = sorted(diff.deleted)
    result.jumps = len(jumps)


def _merge_shared(chain: ChainKey, have: tuple[str, ...], want: tuple[str, ...]
                  ) -> tuple[str, ...]:
    """A shared chain as the kernel holds it plus the rules of `want` it lacks,
    before nat KUBE-SERVICES' closing jump to KUBE-NODEPORTS."""
    present = set(have)
    new = [r for r in want if r not in present and not r.endswith("-j KUBE-NODEPORTS")]
    if not new:
        return have
    if chain == ("nat", "KUBE-SERVICES"):
        at = next((i for i, r in enumerate(have) if r.endswith("-j KUBE-NODEPORTS")),
                  len(have))
        return (*have[:at], *new, *have[at:])
    return (*have, *new)


def sync_first(state: FamilyState, plan: ServiceMap, opts: RuleOptions) -> FamilyResult:
    """A cold start's first write (family `opts.family`): the kernel is read,
    `plan`'s service-port chains are written, the shared chains get their rules
    added to what they hold, chains and jumps the kernel lacks are created;
    nothing is deleted and no other rule changes, so a restart or a takeover
    keeps serving every other Service. The full sync that follows reads no
    more."""
    result = FamilyResult()
    with phase("render"):
        new_sp = render_service_ports(plan, None, opts)
        wanted = desired_ruleset(new_sp, opts)
    with phase("read"):
        builtin, shared = _read(state, wanted)
    jumps = [(t, c, body) for t, c, body in jumps_for(opts)
             if f"-A {c} {body}" not in builtin.get((t, c), ())]
    own = {c for sp in new_sp.values() for c in sp.chains}
    desired: dict[ChainKey, tuple[str, ...]] = {}
    for chain, rules in wanted.items():
        if chain in own or chain not in state.chains:
            desired[chain] = rules
        elif chain in shared:
            desired[chain] = _merge_shared(chain, shared[chain], rules)
    _write(state, result, desired, desired, jumps)
    for t, c, body in jumps:
        builtin[(t, c)] = (f"-A {c} {body}", *builtin.get((t, c), ()))
    state.just_read = builtin
    with phase("conntrack"):
        result.conntrack_deleted = clear_stale_udp(state.kernel, {}, new_sp)
    state.sp_rules = {k: _kept(v) for k, v in new_sp.items()}
    state.plan = plan
    return result


class UdpTargets(Protocol):
    """What conntrack cleanup needs of one service port's rendering."""

    @property
    def udp_targets(self) -> tuple[tuple[str, int], ...]: ...

    @property
    def endpoints(self) -> frozenset[str]: ...


class ConntrackDoor(Protocol):
    def conntrack_delete(self, args: list[str]) -> int: ...


def clear_stale_udp(kernel: ConntrackDoor, old: Mapping[SPKey, UdpTargets],
                    new: Mapping[SPKey, UdpTargets]) -> int:
    """Delete UDP conntrack entries that would keep steering clients to an
    endpoint that is gone, or to nothing (entries created while a service had
    no endpoints), as kube-proxy does after each sync."""
    deleted = 0
    for key in set(old) | set(new):
        if key[1] != "UDP" or old.get(key) is new.get(key):
            continue
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        either = after or before
        assert either is not None
        targets = either.udp_targets
        gone = (before.endpoints if before else frozenset()) - \
            (after.endpoints if after else frozenset())
        for address, port in targets:
            for ip in sorted(gone):
                deleted += kernel.conntrack_delete(
                    ["-p", "udp", "--orig-dst", address, "--orig-port-dst", str(port),
                     "--dst-nat", ip])
            if before is not None and not before.endpoints and after is not None \
                    and after.endpoints:
                deleted += kernel.conntrack_delete(
                    ["-p", "udp", "--orig-dst", address, "--orig-port-dst", str(port)])
    return deleted


def cleanup_family(kernel: IptablesKernel) -> list[str]:
    """Remove svcproxy's jump rules and chains (and kube-proxy iptables-mode
    leftovers, which share the layout); touch nothing else."""
    owned: list[ChainKey] = []
    unjumps = []
    for table in TABLES:
        chains = kernel.save(table)
        owned += [(table, c) for c in chains if is_owned(table, c)]
        # KUBE-FIREWALL only as svcproxy (and kube-proxy) writes it: kubelet's
        # copy of the rule is the same, and kubelet writes it back
        if table == FIREWALL[0] and chains.get(FIREWALL[1]) == (LOCALNET_FILTER,):
            owned.append(FIREWALL)
            jumps: tuple[tuple[str, str, str], ...] = (*JUMPS, *LOCALNET_JUMPS)
        else:
            jumps = JUMPS
        for t, c, body in jumps:
            if t == table and f"-A {c} {body}" in chains.get(c, ()):
                unjumps.append((t, c, body))
    text = restore_text({}, owned, unjumps=unjumps)
    if not text:
        return []
    kernel.restore(text)
    fam = "ip6tables" if kernel.family == 6 else "iptables"
    return [f"{fam}: removed {len(unjumps)} jump rules and {len(owned)} chains"]


def retire_iptables_mode(netns: str | None = None) -> list[str]:
    """Another datapath serves now: remove the iptables datapath's rules (or
    kube-proxy iptables mode's), in both backends and families, where they
    are. Established connections keep their conntrack NAT and never notice.
    A node whose KUBE- chains include ones iptables mode never writes (IPVS
    mode's helper chains share KUBE-SERVICES and friends) is left to that
    datapath."""
    lines: list[str] = []
    for backend in BACKENDS:
        for family in (4, 6):
            kernel = IptablesKernel(family, backend, netns)
            if shutil.which(kernel.tool("save")) is None or (
                    backend == "legacy" and not legacy_tables_loaded(kernel)):
                continue
            try:
                nat = kernel.save("nat")
            except KernelError:
                continue
            ours = [c for c in nat if is_owned("nat", c)]
            if not ours or any(c.startswith("KUBE-") and not is_owned("nat", c) for c in nat):
                continue
            lines += [f"{line} ({backend})" for line in cleanup_family(kernel)]
    return lines
