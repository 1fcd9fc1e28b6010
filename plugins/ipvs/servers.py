"""Reconciling the kernel's IPVS table and kube-ipvs0 with the plan, by diff.

Three diff stores (svcproxy.diffstore) hold what the kernel has as far as
svcproxy knows: virtual servers, each virtual server's real servers, and the
addresses on kube-ipvs0. A sync declares the desired state — of every
frontend (full sync) or of the changed ones (partial sync: the same code,
fewer keys compared) — and sends the difference in one batch. A refused
operation makes the keys it touched unknown; the next sync reads them back.

Semantics (kube-proxy IPVS mode's, and where svcproxy is stricter):

- One virtual server per frontend; real servers in masquerade mode with the
  plan's weights. A Local-policy frontend without local endpoints uses the
  cluster endpoints (kubernetes PR #97081). `mh` always gets mh-fallback, so
  weight-0 real servers never black-hole.
- Ownership: svcproxy changes and deletes only virtual servers it owns — the
  address is bound on kube-ipvs0 (svcproxy's and kube-proxy's VIPs), or it is
  NodePort-shaped (a node address, a port in the NodePort range), or svcproxy
  programmed it. A virtual server of keepalived or another balancer on the
  node is never touched. kube-proxy deletes every virtual server it did not
  create in a sync unless excludeCIDRs covers it.
- excludeCIDRs as kube-proxy: frontends inside the ranges are programmed as
  any other; the ranges only keep virtual servers (and kube-ipvs0 addresses)
  from being deleted.
- Graceful termination as kube-proxy: a TCP real server that is no longer an
  endpoint gets weight 0 and stays until its active and inactive connections
  are both 0 (`drainIgnoresInactive` counts active ones only), or until an
  optional `drainTimeout` (off by default) passes. UDP and SCTP real servers
  are deleted at once (kube-proxy's IsRsGracefulTerminationNeeded), and the
  UDP ones' conntrack entries flushed. An endpoint that comes back while
  draining gets its weight back (kube-proxy deletes and re-adds it, which
  drops its connections).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from svcproxy.diffstore import Diff, DiffStore, diff_items
from svcproxy.ir import Frontend, FrontendKey, ServiceMap
from svcproxy.phases import phase
from svcproxy.plugins.kernel.doors import IpvsBatchDoor, IpvsKernelDoors
from svcproxy.plugins.kernel.ipvs import (
    F_PERSISTENT,
    F_SCHED1,
    SCHED_FLAGS,
    RealServer,
    VirtualServer,
    ipvsadm_dest,
    ipvsadm_service,
)
from svcproxy.plugins.kernel.netlink import Failure

from .helpers import SetIndex, net_changes

VSKey = tuple[str, int, str]
RSKey = tuple[str, int]
RealServers = dict[RSKey, RealServer]
#: the NodePort range kube-apiserver allocates from by default
NODE_PORT_RANGE = (30000, 32767)


def to_ipvs(fe: Frontend) -> tuple[VirtualServer, RealServers]:
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


def describe_failures(failures: Iterable[Failure], plan: ServiceMap) -> list[str]:
    """Refused IPVS operations, each with the Service port it was for."""
    out = []
    for f in failures:
        fe = plan.frontends.get(FrontendKey(*f.key)) if f.key is not None else None
        out.append(f"{f} (Service {fe.service})" if fe is not None else str(f))
    return out


def graceful(protocol: str) -> bool:
    """kube-proxy's IsRsGracefulTerminationNeeded: not for UDP and SCTP."""
    return protocol not in ("UDP", "SCTP")


@dataclass
class Drain:
    vs: VirtualServer
    rs: RealServer
    deadline: float  # math.inf: until its connections end


@dataclass(frozen=True)
class IpvsOptions:
    exclude_cidrs: tuple[str, ...] = ()
    #: graceful termination of TCP real servers (False: deleted at once)
    graceful_termination: bool = True
    #: delete a draining real server after this many seconds even if it still
    #: has connections; 0: never (kube-proxy)
    drain_timeout: float = 0.0
    #: a draining real server goes once it has no *active* connections
    drain_ignores_inactive: bool = False
    node_port_range: tuple[int, int] = NODE_PORT_RANGE


@dataclass
class IpvsResult:
    batch_ops: int = 0
    failures: list[str] = field(default_factory=list)
    bound: int = 0
    unbound: int = 0
    drained: int = 0


@dataclass
class _Batch:
    """One sync's IPVS work: the batch, and what to record once it is taken."""

    ops: IpvsBatchDoor
    vs: Diff[VSKey, VirtualServer] = field(default_factory=Diff)
    rs: dict[VSKey, RealServers | None] = field(default_factory=dict)
    udp_gone: list[tuple[VirtualServer, RealServer]] = field(default_factory=list)


class IpvsState:
    def __init__(self, kernel: IpvsKernelDoors, options: IpvsOptions) -> None:
        self.kernel = kernel
        self.options = options
        self.clock = time.monotonic
        #: what svcproxy believes the kernel holds (only what it owns)
        self.vs: DiffStore[VSKey, VirtualServer] = DiffStore()
        self.rs: DiffStore[VSKey, RealServers] = DiffStore()
        self.addresses: DiffStore[str, bool] = DiffStore()
        self.draining: dict[tuple[VSKey, RSKey], Drain] = {}
        #: the kube-ipvs0 address each frontend needs, counted per address
        self.bound_index = SetIndex()
        self._excluded = [ipaddress.ip_network(c) for c in options.exclude_cidrs]

    # -- what is whose ----------------------------------------------------------------

    def excluded(self, address: str) -> bool:
        if not self._excluded:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in n for n in self._excluded if n.version == ip.version)

    def owns(self, vs: VirtualServer, bound: set[str], node_addresses: set[str],
             planned: ServiceMap | None = None) -> bool:
        """Whether a virtual server found in the kernel is svcproxy's to change
        or delete (module docstring); one the plan wants is taken over."""
        if vs.key in self.vs or vs.address in bound:
            return True
        if planned is not None and FrontendKey(*vs.key) in planned.frontends:
            return True
        low, high = self.options.node_port_range
        return vs.address in node_addresses and low <= vs.port <= high

    def node_addresses(self) -> set[str]:
        return self.kernel.link.other_addresses()

    # -- reading the kernel ---------------------------------------------------------------

    def read_kernel(self, plan: ServiceMap | None = None) -> None:
        """Read everything svcproxy owns back (full syncs, and after a failure)."""
        # kube-ipvs0 exists from the first sync on, services or not, as with
        # kube-proxy (EnsureDummyDevice on every sync)
        link = self.kernel.link
        link.index()
        bound = link.addresses()
        self.addresses.load(dict.fromkeys(bound, True))
        nodes = self.node_addresses()
        # (not /proc/net/ip_vs: the kernel walks every namespace's virtual
        # servers while listing one namespace's, and a listing read in several
        # calls skipped and mixed entries once two namespaces had IPVS tables)
        # (the plan's and the known virtual servers are asked for by key if a
        # long dump missed them: IPVSNetlink.services)
        expect = [*self.vs.have, *((k.address, k.port, k.protocol) for k in plan.frontends)] \
            if plan is not None else list(self.vs.have)
        owned = [vs for vs in self.kernel.nl.services(expect)
                 if self.owns(vs, bound, nodes, plan)]
        # the previous index goes first: at 10,000 services two at once were
        # ~10 MB of peak memory
        self.rs.reset()
        found = self.kernel.nl.dests_of(owned)
        self.vs.load({vs.key: vs for vs in owned})
        self.rs.load({k: {rs.key: rs for rs in found[k]} for k in self.vs.have})

    def read_back(self, keys: set[VSKey]) -> None:
        """Read the virtual servers (and their real servers) a refused batch
        touched; the rest of the store stays as it is."""
        found = {vs.key: vs for vs in self.kernel.nl.get_services(sorted(keys))}
        dests = self.kernel.nl.dests_of(list(found.values()))
        self.vs.load(found, keys)
        self.rs.load({k: {rs.key: rs for rs in dests[k]} for k in found}, keys)

    # -- desired state ------------------------------------------------------------------

    def _address_diff(self, plan: ServiceMap, scope: list[FrontendKey] | None
                      ) -> Diff[str, bool]:
        """The kube-ipvs0 addresses to bind and unbind: every address a frontend
        binds (counted per frontend, so a partial sync looks at the changed
        frontends' addresses only)."""
        added: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []

        def bound(fk: FrontendKey) -> tuple[tuple[str, str], ...]:
            fe = plan.frontends.get(fk)
            return (("kube-ipvs0", fe.address),) if fe is not None and fe.bind_address else ()

        if scope is None:
            self.bound_index = SetIndex()
            for fk in plan.frontends:
                self.bound_index.set(fk, bound(fk), None, added, removed)
            diff = self.addresses.diff(dict.fromkeys((a for _, a in self.bound_index.refs),
                                                     True))
        else:
            for fk in scope:
                self.bound_index.set(fk, bound(fk), None, added, removed)
            net_added, net_removed = net_changes(added, removed)
            touched = [a for _, a in (*net_added, *net_removed)]
            want = {a: True for a in touched if ("kube-ipvs0", a) in self.bound_index.refs}
            diff = self.addresses.diff(want, touched)
        # excludeCIDRs keep addresses from being unbound, as they keep virtual servers
        diff.deleted = {a: v for a, v in diff.deleted.items() if not self.excluded(a)}
        return diff

    def _desired(self, plan: ServiceMap, scope: list[FrontendKey] | None
                 ) -> tuple[dict[VSKey, VirtualServer], dict[VSKey, RealServers],
                            list[VSKey] | None]:
        frontends: Iterable[Frontend]
        if scope is None:
            frontends = plan.frontends.values()
            keys = None
        else:
            frontends = [fe for fk in scope if (fe := plan.frontends.get(fk)) is not None]
            keys = [(fk.address, fk.port, fk.protocol) for fk in scope]
        want_vs: dict[VSKey, VirtualServer] = {}
        want_rs: dict[VSKey, RealServers] = {}
        for fe in frontends:
            vs, rss = to_ipvs(fe)
            want_vs[vs.key] = vs
            want_rs[vs.key] = rss
        return want_vs, want_rs, keys

    # -- sync ----------------------------------------------------------------------------

    def sync(self, plan: ServiceMap, changed: Iterable[FrontendKey] | None, *,
             additive: bool = False) -> IpvsResult:
        """Bring the kernel to `plan`; `changed` None = full sync. `additive`
        (a cold start's first write): only the `changed` frontends are compared,
        after reading the kernel if nothing was read yet, so nothing else the
        kernel holds is touched."""
        result = IpvsResult()
        unread = self.vs.unread or self.rs.unread or self.addresses.unread
        full = changed is None or (unread and not additive)
        scope = None if full or changed is None else list(changed)
        with phase("read"):
            if scope is None or (additive and unread):
                self.read_kernel(plan)
            else:
                keys = {(fk.address, fk.port, fk.protocol) for fk in scope}
                unknown = self.vs.unknown(keys) | self.rs.unknown(keys)
                if unknown:
                    self.read_back(unknown)
        # kube-ipvs0 addresses change in the background while the IPVS batch is
        # built and sent (they do not depend on each other)
        with phase("bind"):
            addr_diff = self._address_diff(plan, scope)
            result.bound, result.unbound = len(addr_diff.created), len(addr_diff.deleted)
            binding = self.kernel.link.start_changes(list(addr_diff.created),
                                                     list(addr_diff.deleted))
        address_failures: list[str] = []
        try:
            # (the batch sends as it grows: building is writing, and a
            # failure part-way makes the next sync a full one, which reads
            # the kernel back)
            with phase("build"):
                work = self._build(plan, scope)
                result.drained = self._reap_drained(work)
            result.batch_ops = len(work.ops)
            with phase("ipvs"):
                failures = describe_failures(work.ops.commit(), plan)
        finally:
            # only the part that did not overlap with the IPVS work
            with phase("addresses"):
                address_failures = self.kernel.link.finish_changes(binding)
        self._record(work, addr_diff, failures, address_failures)
        result.failures = failures + address_failures
        if not failures:
            for vs, rs in work.udp_gone:
                self.kernel.conntrack.delete(
                    ["-p", vs.protocol.lower(), "--orig-dst", vs.address, "--orig-port-dst",
                     str(vs.port), "--dst-nat", rs.address], 6 if ":" in vs.address else 4)
        return result

    def _build(self, plan: ServiceMap, scope: list[FrontendKey] | None) -> _Batch:
        """The batch that brings the kernel to the desired state of `scope`."""
        want_vs, want_rs, keys = self._desired(plan, scope)
        work = _Batch(self.kernel.nl.batch())
        diff = self.vs.diff(want_vs, keys)
        # excludeCIDRs and ownership keep a virtual server; the store forgets it
        kept = [k for k in diff.deleted if self.excluded(k[0])]
        for key in kept:
            del diff.deleted[key]
        work.vs = diff
        for vs in diff.created.values():
            work.ops.add_service(vs)
        for _, vs in diff.updated.values():
            work.ops.update_service(vs)
        for key, vs in diff.deleted.items():
            work.ops.delete_service(vs)
            work.rs[key] = None
            self._forget_drains(key)
            if vs.protocol == "UDP":
                work.udp_gone += [(vs, rs) for rs in (self.rs.get(key) or {}).values()]
        for key in kept:
            work.rs[key] = None
        now = self.clock()
        for key, vs in want_vs.items():
            work.rs[key] = self._real_servers(work, vs, self.rs.get(key) or {}, want_rs[key],
                                              now)
        return work

    def _real_servers(self, work: _Batch, vs: VirtualServer, have: RealServers,
                      want: RealServers, now: float) -> RealServers:
        """Add, reweigh and drain one virtual server's real servers; returns
        what it will hold."""
        key = vs.key
        diff = diff_items(have, want)
        draining = self.draining
        for rk, rs in diff.created.items():
            draining.pop((key, rk), None)
            work.ops.add_dest(vs, rs)
        for rk, (_, rs) in diff.updated.items():
            draining.pop((key, rk), None)  # an endpoint back while draining
            work.ops.update_dest(vs, rs)
        if not diff.deleted:
            return want
        held = dict(want)
        for rk, rs in diff.deleted.items():
            if graceful(vs.protocol) and self.options.graceful_termination:
                if (key, rk) not in draining:
                    if rs.weight != 0:
                        work.ops.update_dest(vs, RealServer(rs.address, rs.port, 0))
                    timeout = self.options.drain_timeout
                    draining[(key, rk)] = Drain(vs, rs, now + timeout if timeout else math.inf)
                held[rk] = RealServer(rs.address, rs.port, 0)
            else:
                work.ops.delete_dest(vs, rs)
                if vs.protocol == "UDP":
                    work.udp_gone.append((vs, rs))
        return held

    def _forget_drains(self, key: VSKey) -> None:
        for dk in [d for d in self.draining if d[0] == key]:
            del self.draining[dk]

    def _reap_drained(self, work: _Batch) -> int:
        """Delete draining real servers whose connections are gone (active and
        inactive, unless configured otherwise) or whose drain timeout passed."""
        if not self.draining:
            return 0
        now = self.clock()
        reaped = 0
        by_vs: dict[VSKey, list[tuple[RSKey, Drain]]] = {}
        for (vk, rk), d in self.draining.items():
            by_vs.setdefault(vk, []).append((rk, d))
        for vk, items in by_vs.items():
            try:
                live = {rs.key: rs for rs in self.kernel.nl.dests(items[0][1].vs)}
            except OSError:
                live = {}  # the virtual server is gone: nothing left to drain
            planned = work.rs.get(vk)
            held = planned if planned is not None else (self.rs.get(vk) or {})
            for rk, d in items:
                cur = live.get(rk)
                if cur is not None and self._busy(cur) and now < d.deadline:
                    continue
                if cur is not None:
                    work.ops.delete_dest(d.vs, d.rs)
                held = {k: v for k, v in held.items() if k != rk}
                del self.draining[(vk, rk)]
                reaped += 1
            if vk in work.rs or vk in self.rs:
                work.rs[vk] = held
        return reaped

    def _busy(self, rs: RealServer) -> bool:
        return rs.active > 0 or (rs.inactive > 0 and not self.options.drain_ignores_inactive)

    def _record(self, work: _Batch, addr_diff: Diff[str, bool], failures: list[str],
                address_failures: list[str]) -> None:
        """The stores follow what the kernel took; what a refused batch touched
        is unknown now and read back by the next sync."""
        if address_failures:
            self.addresses.forget()
        else:
            self.addresses.applied(addr_diff)
        if failures:
            touched = [*work.vs.created, *work.vs.updated, *work.vs.deleted, *work.rs]
            self.vs.forget(touched)
            self.rs.forget(touched)
            return
        self.vs.applied(work.vs)
        for key, held in work.rs.items():
            self.rs.set(key, held)
            if held is None:
                self.vs.set(key, None)

    def table(self) -> dict[VirtualServer, list[RealServer]]:
        """What svcproxy programmed (for rendering and tests)."""
        return {vs: sorted((self.rs.get(k) or {}).values()) for k, vs in self.vs.have.items()}

    def programmed(self) -> int:
        return len(self.vs)


def render_ipvsadm(table: dict[VirtualServer, list[RealServer]]) -> str:
    """The table in `ipvsadm -S -n` format (masquerade real servers)."""
    lines = []
    for vs in sorted(table, key=lambda v: (":" in v.address, v.protocol, v.address, v.port)):
        lines.append(ipvsadm_service(vs))
        lines += [ipvsadm_dest(vs, rs) for rs in sorted(table[vs])]
    return "\n".join(lines) + ("\n" if lines else "")
