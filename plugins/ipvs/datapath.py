"""Reconciling the kernel's IPVS table and kube-ipvs0 with the plan.

- One virtual server per frontend; real servers in masquerade mode with the
  plan's weights. A Local-policy frontend without local endpoints uses the
  cluster endpoints, as kube-proxy's IPVS mode does.
- `mh` always gets mh-fallback, so weight-0 real servers never black-hole.
- Partial syncs diff the changed frontends against an index of what was
  programmed; full syncs dump the kernel (one batched read) and repair drift.
  Virtual servers inside excludeCIDRs are never touched.
- Graceful termination: a TCP real server that goes away gets weight 0 and is
  deleted once it has no active connections (inactive ones too, unless
  configured otherwise) or its drain limit passed. UDP and SCTP real servers
  are deleted at once and their conntrack entries flushed.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from svcproxy.ir import Frontend, FrontendKey, ServiceMap
from svcproxy.plugins.kernel.ipset import IpsetNetlink
from svcproxy.plugins.kernel.iptables import IptablesKernel, Table, parse_save, restore_text
from svcproxy.plugins.kernel.ipvs import (
    F_PERSISTENT,
    F_SCHED1,
    F_SCHED2,
    SCHED_FLAGS,
    RealServer,
    VirtualServer,
)
from svcproxy.plugins.kernel.netns import opened_in

from .helpers import (
    JUMPS,
    SETS,
    HelperOptions,
    SetIndex,
    frontend_entries,
    health_check_entries,
    helper_chains,
    ipset_create,
    is_owned,
    net_changes,
    set_name,
    vip_source_rule,
)
from .kernel import IpvsKernel

log = logging.getLogger(__name__)

VSKey = tuple[str, int, str]
RSKey = tuple[str, int]


def to_ipvs(fe: Frontend) -> tuple[VirtualServer, dict[RSKey, RealServer]]:
    backends = fe.backends
    if fe.traffic_policy == "Local" and not backends:
        backends = fe.cluster_backends  # kube-proxy's IPVS fallback (PR #97081)
    flags = 0
    for name in fe.scheduler_flags:
        flags |= SCHED_FLAGS[name]
    if fe.scheduler == "mh":
        flags |= F_SCHED1  # mh-fallback: skip weight-0 real servers
    timeout = 0
    if fe.persistence_timeout:
        flags |= F_PERSISTENT
        timeout = fe.persistence_timeout
    vs = VirtualServer(fe.address, fe.port, fe.protocol, fe.scheduler, flags, timeout)
    return vs, {(b.address, b.port): RealServer(b.address, b.port, b.weight) for b in backends}


@dataclass
class Drain:
    vs: VirtualServer
    rs: RealServer
    deadline: float


@dataclass
class IpvsOptions:
    exclude_cidrs: tuple[str, ...] = ()
    drain_seconds: float = 30.0
    drain_ignores_inactive: bool = True


@dataclass
class IpvsResult:
    batch_ops: int = 0
    failures: list[str] = field(default_factory=list)
    bound: int = 0
    unbound: int = 0
    drained: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class IpvsState:
    def __init__(self, kernel: IpvsKernel, options: IpvsOptions) -> None:
        self.kernel = kernel
        self.options = options
        self.clock = time.monotonic
        #: what svcproxy believes the kernel holds (None: unknown, read it)
        self.services: dict[VSKey, VirtualServer] | None = None
        self.dests: dict[VSKey, dict[RSKey, RealServer]] = {}
        self.draining: dict[tuple[VSKey, RSKey], Drain] = {}
        self.addresses: set[str] | None = None
        #: the kube-ipvs0 address each frontend needs, counted per address
        self.bound_index = SetIndex()
        self._excluded = [ipaddress.ip_network(c) for c in options.exclude_cidrs]

    def excluded(self, address: str) -> bool:
        if not self._excluded:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in n for n in self._excluded if n.version == ip.version)

    def read_kernel(self) -> None:
        # the previous index goes first: at 10,000 services two of them at once
        # were ~10 MB of peak memory
        self.services, self.dests = None, {}
        # kube-ipvs0 exists from the first sync on, services or not, as with
        # kube-proxy (EnsureDummyDevice on every sync); registering a device is
        # slow work in the kernel that the first sync with services need not wait
        # for
        self.kernel.dummy_index()
        services: dict[VSKey, VirtualServer] = {}
        dests: dict[VSKey, dict[RSKey, RealServer]] = {}
        nl = self.kernel.nl
        # (not /proc/net/ip_vs: the kernel walks every namespace's virtual
        # servers while listing one namespace's, and a listing read in several
        # calls skipped and mixed entries once two namespaces had IPVS tables)
        for vs in nl.services():
            if not self.excluded(vs.address):
                services[vs.key] = vs
        for key, found in nl.dests_of(list(services.values())).items():
            dests[key] = {(rs.address, rs.port): rs for rs in found}
        self.services, self.dests = services, dests
        self.addresses = self.kernel.bound_addresses()

    def sync(self, plan: ServiceMap, changed: Iterable[FrontendKey] | None) -> IpvsResult:
        """Bring the kernel to `plan`; `changed` None = full sync."""
        result = IpvsResult()
        t0 = time.perf_counter()
        full = changed is None or self.services is None
        if full:
            self.read_kernel()
            keys = set(plan.frontends)
            wanted = {(fk.address, fk.port, fk.protocol) for fk in keys}
            stale = [k for k in self.services or {} if k not in wanted]
            scope: Iterable[FrontendKey] = keys
        else:
            assert changed is not None and self.services is not None
            have_services = self.services
            scope = list(changed)
            stale = [(k.address, k.port, k.protocol) for k in scope
                     if k not in plan.frontends and
                     (k.address, k.port, k.protocol) in have_services]
        result.phases["read"] = time.perf_counter() - t0
        assert self.services is not None
        # kube-ipvs0 addresses change in the background while the IPVS batch is
        # built and sent (they do not depend on each other)
        t_addr = time.perf_counter()
        add, remove = self._plan_addresses(plan, None if full else scope)
        result.bound, result.unbound = len(add), len(remove)
        binding = self.kernel.start_address_changes(add, remove)
        result.phases["addresses.start"] = time.perf_counter() - t_addr
        batch = self.kernel.nl.batch()
        now = self.clock()
        # what self.services becomes once the kernel took the batch (a partial
        # sync records only its changes: copying 10,000 entries per sync was a
        # third of a one-endpoint change)
        # (a full sync visits every frontend of the plan and every stale virtual
        # server, so it builds both maps from nothing rather than copying)
        new_services: dict[VSKey, VirtualServer | None] = {}
        new_dests = {} if full else self.dests
        deletes_udp: list[tuple[VirtualServer, RealServer]] = []
        for fk in scope:
            fe = plan.frontends.get(fk)
            if fe is None or self.excluded(fe.address):
                continue
            vs, want = to_ipvs(fe)
            vkey = vs.key
            have_vs = self.services.get(vkey)
            if have_vs is None:
                batch.add_service(vs)
                have: dict[RSKey, RealServer] = {}
            else:
                have = dict(self.dests.get(vkey, {}))
                if have_vs != vs:
                    batch.update_service(vs)
            new_services[vkey] = vs
            draining = self.draining
            for rk, rs in want.items():
                if draining:
                    draining.pop((vkey, rk), None)
                cur = have.get(rk)
                if cur is None:
                    batch.add_dest(vs, rs)
                elif cur.weight != rs.weight or cur.fwd_method != rs.fwd_method:
                    batch.update_dest(vs, rs)
            for rk, rs in have.items():
                if rk in want:
                    continue
                if vs.protocol == "TCP" and self.options.drain_seconds > 0:
                    if (vs.key, rk) not in self.draining:
                        if rs.weight != 0:
                            batch.update_dest(vs, RealServer(rs.address, rs.port, 0))
                        self.draining[(vs.key, rk)] = Drain(
                            vs, rs, now + self.options.drain_seconds)
                    want_keep = RealServer(rs.address, rs.port, 0)
                    want = {**want, rk: want_keep}
                else:
                    batch.delete_dest(vs, rs)
                    deletes_udp.append((vs, rs))
            new_dests[vs.key] = want
        for key in stale:
            old = self.services.get(key)
            if old is None or self.excluded(old.address):
                continue
            batch.delete_service(old)
            new_services[key] = None
            new_dests.pop(key, None)
            for dk in [d for d in self.draining if d[0] == key]:
                del self.draining[dk]
            if old.protocol != "TCP":
                deletes_udp += [(old, rs) for rs in self.dests.get(key, {}).values()]
        result.drained = self._reap_drained(batch, new_dests, now)
        t1 = time.perf_counter()
        result.batch_ops = len(batch)
        address_failures: list[str] = []
        try:
            failures = batch.commit()
        finally:
            result.phases["ipvs"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            address_failures = self.kernel.finish_address_changes(binding)
            # only the part that did not overlap with the IPVS work
            result.phases["addresses"] = time.perf_counter() - t2
        if address_failures:
            self.addresses = None  # unknown now: read kube-ipvs0 back next time
            result.failures = address_failures
        if failures:
            self.services = None  # unknown now: the next (full) sync reads it back
            result.failures = [str(f) for f in failures] + address_failures
            return result
        if full:
            self.services = {k: v for k, v in new_services.items() if v is not None}
        else:
            for key, new_vs in new_services.items():
                if new_vs is None:
                    self.services.pop(key, None)
                else:
                    self.services[key] = new_vs
        self.dests = new_dests
        for vs, rs in deletes_udp:
            fam = 6 if ":" in vs.address else 4
            self.kernel.conntrack_delete(["-p", vs.protocol.lower(), "--orig-dst", vs.address,
                                          "--orig-port-dst", str(vs.port), "--dst-nat",
                                          rs.address], fam)
        return result

    def _reap_drained(self, batch: object, dests: dict[VSKey, dict[RSKey, RealServer]],
                      now: float) -> int:
        """Delete draining real servers whose connections are gone or whose drain
        limit passed."""
        if not self.draining:
            return 0
        reaped = 0
        by_vs: dict[VSKey, list[tuple[RSKey, Drain]]] = {}
        for (vk, rk), d in self.draining.items():
            by_vs.setdefault(vk, []).append((rk, d))
        for vk, items in by_vs.items():
            live = {rs.key: rs for rs in self.kernel.nl.dests(items[0][1].vs)}
            for rk, d in items:
                cur = live.get(rk)
                busy = cur is not None and (cur.active > 0 or (
                    cur.inactive > 0 and not self.options.drain_ignores_inactive))
                if cur is not None and busy and now < d.deadline:
                    continue
                if cur is not None:
                    batch.delete_dest(d.vs, d.rs)  # type: ignore[attr-defined]
                dests.get(vk, {}).pop(rk, None)
                del self.draining[(vk, rk)]
                reaped += 1
        return reaped

    def table(self) -> dict[VirtualServer, list[RealServer]]:
        """What svcproxy programmed (for rendering and tests)."""
        return {vs: sorted(self.dests.get(k, {}).values())
                for k, vs in (self.services or {}).items()}

    def _plan_addresses(self, plan: ServiceMap, scope: Iterable[FrontendKey] | None
                        ) -> tuple[list[str], list[str]]:
        """The kube-ipvs0 addresses to add and remove: every address a frontend
        binds; a full sync compares with the kernel, a partial one follows the
        changed frontends' counts."""
        added: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []

        def bound(fk: FrontendKey) -> tuple[tuple[str, str], ...]:
            fe = plan.frontends.get(fk)
            if fe is None or not fe.bind_address or self.excluded(fe.address):
                return ()
            return (("kube-ipvs0", fe.address),)

        if scope is None or self.addresses is None:
            self.bound_index = SetIndex()
            for fk in plan.frontends:
                self.bound_index.set(fk, bound(fk), None, added, removed)
            want = {a for _, a in self.bound_index.refs}
            have = self.addresses if self.addresses is not None else \
                self.kernel.bound_addresses()
            self.addresses = want
            return sorted(want - have), sorted(have - want)
        for fk in scope:
            self.bound_index.set(fk, bound(fk), None, added, removed)
        # an address that moved between frontends in this sync stays bound
        net_added, net_removed = net_changes(added, removed)
        add = [a for _, a in net_added]
        remove = [a for _, a in net_removed]
        self.addresses.update(add)
        self.addresses.difference_update(remove)
        return add, remove


def render_ipvsadm(table: dict[VirtualServer, list[RealServer]]) -> str:
    """The table in `ipvsadm -S -n` format (masquerade real servers)."""
    lines = []
    for vs in sorted(table, key=lambda v: (":" in v.address, v.protocol, v.address, v.port)):
        proto = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs.protocol]
        host = f"[{vs.address}]" if ":" in vs.address else vs.address
        head = f"-A {proto} {host}:{vs.port} -s {vs.scheduler}"
        names = []
        prefix = vs.scheduler if vs.scheduler in ("sh", "mh") else ""
        if vs.flags & F_SCHED1:
            names.append(f"{prefix}-fallback" if prefix else "flag-1")
        if vs.flags & F_SCHED2:
            names.append(f"{prefix}-port" if prefix else "flag-2")
        if names:
            head += " -b " + ",".join(names)
        if vs.flags & F_PERSISTENT:
            head += f" -p {vs.timeout}"
        lines.append(head)
        for rs in sorted(table[vs]):
            rhost = f"[{rs.address}]" if ":" in rs.address else rs.address
            lines.append(f"-a {proto} {host}:{vs.port} -r {rhost}:{rs.port} -m -w {rs.weight}")
    return "\n".join(lines) + ("\n" if lines else "")


class HelperState:
    """The ipsets and iptables helper rules of one IP family.

    A full sync reads the kernel (`ipset save`, `iptables-save`) and writes the
    difference; a partial sync recomputes only the changed frontends' set
    members (SetIndex) and rewrites only chains whose rules changed."""

    def __init__(self, kernel: IpvsKernel, family: int, backend: str) -> None:

        self.kernel = kernel
        self.family = family
        self.ipt = IptablesKernel(family, backend, kernel.netns)
        self.sets: dict[str, set[str]] | None = None
        self.chains: dict[tuple[str, str], tuple[str, ...]] | None = None
        self.index = SetIndex()
        #: the Service of each frontend, and each Service's health check node port
        self.service_of: dict[FrontendKey, str] = {}
        self.health_port: dict[str, str] = {}
        self.opts: HelperOptions | None = None
        self.ipset_nl: IpsetNetlink | None = None
        #: early() read the kernel and nothing else wrote since: the first full
        #: sync need not read it again
        self.just_read = False
        #: seconds spent in each step of the last sync (for the sync phases)
        self.phases: dict[str, float] = {}

    def read(self) -> None:
        # one iptables-save for both tables (every exec counts on a busy node),
        # and meanwhile the sets through one netlink dump
        with ThreadPoolExecutor(max_workers=1) as pool:
            saving = pool.submit(self.ipt.run, [self.ipt.tool("save")])
            ours = {set_name(k, self.family) for k in SETS}
            self.sets = self._ipset().read(ours.__contains__)
            ipt_text = saving.result().stdout
        self.chains = {}
        self._builtin: dict[tuple[str, str], tuple[str, ...]] = {}
        saved = parse_save(ipt_text)
        for table in ("nat", "filter"):
            for chain, rules in saved.get(table, Table()).chains.items():
                target = self.chains if is_owned(table, chain) else self._builtin
                target[(table, chain)] = rules

    def early(self, bound: Iterable[str], opts: HelperOptions) -> bool:
        """Before the first sync: make sure addresses already on kube-ipvs0 (from a
        previous run, or kube-proxy's) are in KUBE-IPVS-IPS and node traffic from
        them is masqueraded, so the node keeps reaching the API server through
        its VIP while a long first sync runs. Returns whether it wrote."""
        self.read()
        assert self.sets is not None and self.chains is not None
        fam = self.family
        name = set_name("KUBE-IPVS-IPS", fam)
        members = {a for a in bound if (":" in a) == (fam == 6)}
        missing = sorted(members - self.sets.get(name, set()))
        wrote = False
        if name not in self.sets:
            self._create_sets([name])
            wrote = True
        if missing:
            self._write_members([(name, m) for m in missing], [])
            self.sets[name].update(missing)
            wrote = True
        key = ("nat", "KUBE-POSTROUTING")
        have = self.chains.get(key)
        first = vip_source_rule(fam)
        jumps = [j for j in JUMPS if j[1] == "POSTROUTING"
                 and f"-A {j[1]} {j[2]}" not in self._builtin.get(("nat", j[1]), ())]
        if have is None or first not in have or jumps:
            rules = (first, *(r for r in have or () if r != first))
            self.ipt.restore(restore_text({key: rules}, [], jumps))
            self.chains[key] = rules
            self._builtin.update({("nat", c): (*self._builtin.get(("nat", c), ()), f"-A {c} {b}")
                                  for _, c, b in jumps})
            wrote = True
        self.just_read = True
        return wrote

    def sync(self, plan: ServiceMap, changed: Iterable[FrontendKey] | None,
             opts: HelperOptions, excluded: Callable[[str], bool]) -> int:
        """Write what differs (`changed` None: full sync); returns the number of
        set members and chains written."""
        t0 = time.perf_counter()
        fam = self.family
        node = ipaddress.ip_address(opts.node_ip) if opts.node_ip else None
        adds: list[tuple[str, str]] = []
        dels: list[tuple[str, str]] = []
        t_read = 0.0
        if changed is None or self.sets is None or self.chains is None or opts != self.opts:
            if not self.just_read:  # early() read the kernel moments ago
                self.read()
                t_read = time.perf_counter() - t0
            self.just_read = False
            assert self.sets is not None
            jumps = [(t, c, b) for t, c, b in JUMPS
                     if f"-A {c} {b}" not in self._builtin.get((t, c), ())]
            self.index = SetIndex()
            sink: list[tuple[str, str]] = []
            for fe in plan.frontends.values():
                if fe.family == fam:
                    self.index.set(fe.key, *frontend_entries(
                        fe, node, fe.bind_address and not excluded(fe.address)), sink, sink)
            desired = self.index.members()
            desired["KUBE-HEALTH-CHECK-NODE-PORT"] = health_check_entries(plan)
            self.service_of = {fe.key: fe.service_key for fe in plan.frontends.values()}
            self.health_port = {k: str(s.health_check_node_port)
                                for k, s in plan.services.items() if s.health_check_node_port}
            for base, members in desired.items():
                have = self.sets.get(set_name(base, fam), set())
                adds += [(base, m) for m in sorted(members - have)]
                dels += [(base, m) for m in sorted(have - members)]
        else:
            jumps = []
            for fk in changed:
                if (":" in fk.address) != (fam == 6):
                    continue
                changed_fe = plan.frontends.get(fk)
                if changed_fe is None:
                    self.index.set(fk, (), None, adds, dels)
                else:
                    fe = changed_fe
                    self.index.set(fk, *frontend_entries(
                        fe, node, fe.bind_address and not excluded(fe.address)), adds, dels)
            adds, dels = net_changes(adds, dels)
            self._health_ports(plan, changed, adds, dels)
        self.opts = opts
        assert self.sets is not None and self.chains is not None
        missing = [set_name(k, fam) for k in SETS if set_name(k, fam) not in self.sets]
        t1 = time.perf_counter()
        if missing:
            self._create_sets(missing)
        if adds or dels:
            self._write_members([(set_name(k, fam), m) for k, m in adds],
                                [(set_name(k, fam), m) for k, m in dels])
            for k, m in adds:
                self.sets[set_name(k, fam)].add(m)
            for k, m in dels:
                self.sets[set_name(k, fam)].discard(m)
        t2 = time.perf_counter()
        chains = helper_chains(self.sets, sorted(set(self.index.out_filter.values())), opts)
        writes = {c: r for c, r in chains.items() if self.chains.get(c) != r}
        text = restore_text(writes, [], jumps)
        if text:
            try:
                self.ipt.restore(text)
            except Exception:
                self.chains = None
                raise
            self.chains.update(writes)
        t3 = time.perf_counter()
        self.phases = {"read": t_read, "sets": t1 - t0 - t_read, "ipset": t2 - t1,
                       "rules": t3 - t2}
        return len(adds) + len(dels) + len(writes) + len(jumps)

    def _create_sets(self, names: list[str]) -> None:
        """Create sets (rare: the first sync) with `ipset restore`."""
        assert self.sets is not None
        text = ipset_create(names, self.family)
        proc = self.kernel._run(["ipset", "restore"], check=False, stdin=text)
        if proc.returncode != 0:
            self.sets = None
            raise OSError(f"ipset restore failed: {proc.stderr.strip()}")
        for name in names:
            self.sets.setdefault(name, set())

    def _ipset(self) -> IpsetNetlink:
        if self.ipset_nl is None:
            self.ipset_nl = opened_in(self.kernel.netns, IpsetNetlink)
        return self.ipset_nl

    def _write_members(self, adds: list[tuple[str, str]], dels: list[tuple[str, str]]) -> None:
        """Members through batched netlink (kernel/ipset.py); a refusal makes the
        next sync re-read the sets."""
        failures = self._ipset().write(adds, dels, self.family)
        if failures:
            self.sets = None
            shown = "; ".join(str(f) for f in failures[:5])
            raise OSError(f"the kernel refused {len(failures)} of {len(adds) + len(dels)} "
                          f"ipset changes: {shown}")

    def _health_ports(self, plan: ServiceMap, changed: Iterable[FrontendKey],
                      adds: list[tuple[str, str]], dels: list[tuple[str, str]]) -> None:
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
        if touched:
            after = set(self.health_port.values())
            adds += [("KUBE-HEALTH-CHECK-NODE-PORT", m) for m in sorted(after - before)]
            dels += [("KUBE-HEALTH-CHECK-NODE-PORT", m) for m in sorted(before - after)]

    def cleanup(self) -> list[str]:
        self.read()
        assert self.sets is not None and self.chains is not None
        unjumps = [(t, c, b) for t, c, b in JUMPS
                   if f"-A {c} {b}" in self._builtin.get((t, c), ())]
        text = restore_text({}, list(self.chains), unjumps=unjumps)
        lines = []
        if text:
            self.ipt.restore(text)
            lines.append(f"ipvs: removed {len(unjumps)} jump rules and {len(self.chains)} "
                         f"chains (IPv{self.family})")
        ours = [n for n in self.sets if n in {set_name(k, self.family) for k in SETS}]
        for name in ours:
            self.kernel._run(["ipset", "destroy", name], check=False)
        if ours:
            lines.append(f"ipvs: removed {len(ours)} ipsets (IPv{self.family})")
        return lines
