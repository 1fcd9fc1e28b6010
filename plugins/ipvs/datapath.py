"""Reconciling kube-proxy IPVS mode's helper ipsets and iptables rules (one
IP family each) with the plan. The virtual servers, real servers and
kube-ipvs0 addresses are servers.py's.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from svcproxy.ir import FrontendKey, ServiceMap
from svcproxy.plugins.kernel.ipset import IpsetNetlink
from svcproxy.plugins.kernel.iptables import IptablesKernel, Table, parse_save, restore_text
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
             opts: HelperOptions) -> int:
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
                        fe, node, fe.bind_address), sink, sink)
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
                        fe, node, fe.bind_address), adds, dels)
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
