"""Built-in datapath plugin `ipvs`: IPVS virtual servers for every frontend.

The probe is functional, as kube-proxy's is since v1.27 (PR #114669): load the
ip_vs module if needed, then create and delete a test virtual server
(198.51.100.0:20000/TCP, TEST-NET-2) with the configured scheduler. A failure
is reported in words a user can act on, and svcproxy falls back to the next
datapath.

It programs virtual and real servers (batched netlink), kube-ipvs0 and its
addresses, kube-proxy IPVS mode's ipsets and iptables helper rules, the sysctls
IPVS needs (recorded and restored by cleanup) and the IPVS timeouts, and drains
removed TCP real servers. See docs/ipvs.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from svcproxy import hookimpl
from svcproxy.config import IPVS_SCHEDULERS, Config
from svcproxy.datapath import ApplyResult, CheckItem, MetricSample, ProbeResult
from svcproxy.errors import PluginError, SyncError
from svcproxy.ir import Frontend, PlanDelta, ServiceMap, ip_family
from svcproxy.phases import phase
from svcproxy.plan import PortContext
from svcproxy.plugins.kernel.conntrack import conntrack_samples
from svcproxy.plugins.kernel.ipset import Ipset
from svcproxy.plugins.kernel.iptables import IptablesKernel
from svcproxy.plugins.kernel.ipvs import SCHED_FLAGS, VirtualServer, probe_ipvs
from svcproxy.plugins.kernel.netns import in_netns, opened_in, read_proc
from svcproxy.plugins.kernel.sysctl import DEFAULT_BACKUP, SysctlStore
from svcproxy.plugins.kernel.tools import KernelError

from .helper_state import HelperState
from .helpers import HelperOptions
from .kernel import IpvsKernel
from .servers import NODE_PORT_RANGE, IpvsOptions, IpvsState, render_ipvsadm, to_ipvs

log = logging.getLogger(__name__)

NAME = "ipvs"


def _raise_refused(failures: list[str]) -> None:
    """Fail the sync naming what the kernel refused (the rest was written)."""
    if failures:
        shown = "; ".join(failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise SyncError(f"the kernel refused {len(failures)} IPVS, kube-ipvs0 and ipset "
                        f"changes; the rest was written: {shown}{more}")


class _PreviewKernel:
    """IpvsKernelDoors over preview doors (plan --against-kernel)."""

    def __init__(self, nl: Any, link: Any, conntrack: Any) -> None:
        self.nl, self.link, self.conntrack = nl, link, conntrack
SCHEDULER_ANNOTATION = "svcproxy.io/ipvs-scheduler"
FLAGS_ANNOTATION = "svcproxy.io/ipvs-scheduler-flags"
SCHEDULERS = IPVS_SCHEDULERS


#: sysctls the datapath needs (kube-proxy's pkg/proxy/ipvs/proxier.go)
SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}
#: where the previous values of changed sysctls are kept for `svcproxy cleanup`
SYSCTL_BACKUP = DEFAULT_BACKUP


def _flag(options: Mapping[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise PluginError(f"ipvs: {name} must be true or false (got {value!r})")
    return value


def _seconds(options: Mapping[str, Any], name: str) -> float:
    value = options.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PluginError(f"ipvs: {name} must be a number of seconds >= 0 (got {value!r})")
    return float(value)


def _port_range(value: object) -> tuple[int, int]:
    """nodePortRange "30000-32767" (kube-apiserver's --service-node-port-range)."""
    if value is None:
        return NODE_PORT_RANGE
    parts = str(value).split("-")
    try:
        low, high = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        low = high = -1
    if not 0 < low <= high <= 65535:
        raise PluginError(f"ipvs: nodePortRange must look like 30000-32767 (got {value!r})")
    return low, high


def _flags_for(scheduler: str) -> list[str]:
    return [f for f in SCHED_FLAGS if f.startswith("flag-") or f[:2] == scheduler]


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (ValueError, IndexError):
        return (0, 0)


class IpvsPlugin:
    def __init__(self) -> None:
        self.config = Config()
        self.netns: str | None = None
        self.helpers: dict[int, HelperState] = {}
        self.active = False
        #: nftables-mode tables removed after the first full sync
        self.retired = False
        self.options = IpvsOptions()
        self.backup_path = SYSCTL_BACKUP
        self.state: IpvsState | None = None
        self.kernel: IpvsKernel | None = None
        #: the start-up warm-up (_warm_up), until the first use of the helpers
        self._warming: threading.Thread | None = None
        #: the early masquerade ran in this datapath life (_early_once)
        self.early_done = False

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config, options: Mapping[str, Any]) -> None:
        self.config = config
        known = {"netns", "gracefulTermination", "drainTimeout", "drainIgnoresInactive",
                 "nodePortRange", "sysctlBackup"}
        if "drainSeconds" in options:
            raise PluginError("ipvs: option 'drainSeconds' is gone: draining real servers "
                              "now stay until their connections end, as with kube-proxy; "
                              "set 'drainTimeout' (seconds) to bound that")
        unknown = sorted(set(options) - known)
        if unknown:
            raise PluginError(f"ipvs: unknown option {unknown[0]!r} (options: "
                              f"{', '.join(sorted(known))})")
        self.netns = options.get("netns")
        self.backup_path = str(options.get("sysctlBackup", SYSCTL_BACKUP))
        self.options = IpvsOptions(
            exclude_cidrs=config.kube_proxy.ipvs.exclude_cidrs,
            graceful_termination=_flag(options, "gracefulTermination", True),
            drain_timeout=_seconds(options, "drainTimeout"),
            drain_ignores_inactive=_flag(options, "drainIgnoresInactive", False),
            node_port_range=_port_range(options.get("nodePortRange")))

    @hookimpl
    def svcproxy_adjust_frontend(self, frontend: Frontend, port: PortContext) -> Frontend | None:
        """The per-Service scheduler: annotations `svcproxy.io/ipvs-scheduler` and
        `svcproxy.io/ipvs-scheduler-flags` (comma-separated). A bad value is
        reported (log line, Warning Event on the Service) and the configured
        scheduler is used instead."""
        wanted = port.service.annotation(SCHEDULER_ANNOTATION)
        flags_text = port.service.annotation(FLAGS_ANNOTATION)
        if wanted is None and flags_text is None:
            return None
        scheduler = frontend.scheduler
        if wanted is not None:
            wanted = wanted.strip()
            if wanted in SCHEDULERS:
                scheduler = wanted
            else:
                port.warn("InvalidIPVSScheduler",
                          f"annotation {SCHEDULER_ANNOTATION}: unknown scheduler {wanted!r} "
                          f"(one of {', '.join(SCHEDULERS)}); using {scheduler}")
                return None
        flags: tuple[str, ...] = ()
        if flags_text:
            names = tuple(f.strip() for f in flags_text.split(",") if f.strip())
            bad = [f for f in names if f not in SCHED_FLAGS or (
                f[:3] in ("sh-", "mh-") and f[:2] != scheduler)]
            if bad:
                port.warn("InvalidIPVSSchedulerFlags",
                          f"annotation {FLAGS_ANNOTATION}: flag {bad[0]!r} is not valid with "
                          f"scheduler {scheduler} (valid: {', '.join(_flags_for(scheduler))}); "
                          f"no flags used")
            else:
                flags = names
        return replace(frontend, scheduler=scheduler, scheduler_flags=flags)

    @hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [NAME]

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str) -> None:
        self.active = datapath == NAME
        if self.active:
            self._warming = threading.Thread(target=self._warm_up, name="ipvs-warm-up",
                                             daemon=True)
            self._warming.start()

    def _warm_up(self) -> None:
        """While the initial lists load (most of a minute for 10,000 Services in
        the emulated VM), what a new node's first write would otherwise wait
        for and that decides nothing: the helper rules' iptables backend, and
        the kernel modules of the set types and of the helper rules' matches
        and targets (the kernel runs modprobe for each on first use;
        HelperState.warm_up). Nothing is written. A failure is left to the
        first sync, which does the same and reports it."""
        try:
            self._helper(4, warming=True).warm_up()
        except Exception as exc:  # the first sync tries again and says why
            log.debug("ipvs warm-up: %s", exc)

    def _warmed(self) -> None:
        """Wait for the warm-up (the helpers' doors are not shared between
        threads)."""
        warming = self._warming
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming = None

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str) -> None:
        """Active again (or for the first time) while running: start from
        scratch (the sysctls first), and retire the previous datapath's state
        once this one serves."""
        self.active = datapath == NAME
        if self.active:
            self._warmed()
            self.state = None
            self.helpers.clear()
            self.retired = False
            self.early_done = False

    @hookimpl
    def svcproxy_list_node_addresses(self, family: int) -> list[str] | None:
        """The node's own addresses, as kube-proxy's IPVS mode finds them: every
        local address except those on kube-ipvs0, loopback and IPv6 link-local
        (IPv4 link-local is kept). NodePort virtual servers go on each. Only
        while IPVS is the active datapath."""
        if not self.active:
            return None
        try:
            out = []
            for address in self._kernel().link.other_addresses():
                ip = ipaddress.ip_address(address)
                if ip.version != family or ip.is_loopback or (
                        ip.version == 6 and ip.is_link_local):
                    continue
                out.append(str(ip))
            return sorted(set(out), key=lambda x: ipaddress.ip_address(x))
        except Exception as exc:  # e.g. no IPVS here: let the Node object answer
            log.debug("cannot list node addresses: %s", exc)
            return None

    @hookimpl
    def svcproxy_collect_metrics(self) -> list[MetricSample] | None:
        if not self.active:
            return None
        out = conntrack_samples(self.netns)
        text = read_proc("/proc/thread-self/net/ip_vs_conn", self.netns)
        if text is not None:
            out.append(MetricSample("svcproxy_ipvs_connection_entries",
                                    "Entries in the IPVS connection table",
                                    float(max(0, text.count("\n") - 1))))
        if self.state is not None:
            out.append(MetricSample("svcproxy_ipvs_virtual_servers",
                                    "IPVS virtual servers svcproxy programmed",
                                    float(self.state.programmed())))
        return out

    @hookimpl
    def svcproxy_datapath_status(self, name: str, frontends: Mapping[tuple[str, int, str],
                                                                     Mapping[str, Any]],
                                 connections: bool) -> dict[str, Any] | None:
        if name != NAME:
            return None
        from svcproxy.plugins.kernel.ipvs import IPVSNetlink

        from .status import ipvs_status

        with opened_in(self.netns, IPVSNetlink) as nl:
            return ipvs_status(nl, self.netns, frontends, connections)

    @hookimpl
    def svcproxy_render_status(self, name: str, view: Mapping[str, Any], stats: bool,
                               rate: bool, connections: bool) -> str | None:
        """Like `ipvsadm -L -n` (`--stats`, `--rate`, `--connection`)."""
        if name != NAME:
            return None
        from .status import render_ipvs

        return render_ipvs(view, stats, rate, connections)

    @hookimpl
    def svcproxy_check(self, config: Config) -> list[CheckItem]:
        from .status import ipvs_checks

        probe = self.svcproxy_probe_datapath(NAME)
        reason = None if probe is None or probe.usable else probe.reason
        if reason is not None and reason.startswith("ipset"):
            reason = None  # reported on its own line
        return ipvs_checks(config.kube_proxy.ipvs_scheduler, reason, self.netns,
                           self._wanted_sysctls())

    @hookimpl
    def svcproxy_list_plan_formats(self) -> list[str]:
        return ["ipvsadm"]

    @hookimpl
    def svcproxy_probe_datapath(self, name: str) -> ProbeResult | None:
        if name != NAME:
            return None
        try:
            with in_netns(self.netns):
                reason = probe_ipvs(self.config.kube_proxy.ipvs_scheduler)
        except Exception as exc:  # pyroute2 raises many kinds; all mean "unusable"
            reason = f"IPVS probe failed: {type(exc).__name__}: {exc}"
        if reason is None and shutil.which("ipset") is None:
            reason = "ipset not found (install the ipset package)"
        return ProbeResult.unusable(reason) if reason else ProbeResult.ok()

    def _state(self) -> IpvsState:
        if self.state is None:
            kernel = self._kernel()
            self._ensure_sysctls()
            kp = self.config.kube_proxy.ipvs
            if kp.tcp_timeout or kp.tcp_fin_timeout or kp.udp_timeout:
                kernel.nl.set_timeouts(int(kp.tcp_timeout), int(kp.tcp_fin_timeout),
                                       int(kp.udp_timeout))
            self.state = IpvsState(kernel, self.options)
        return self.state

    def _kernel(self) -> IpvsKernel:
        if self.kernel is None:
            self.kernel = IpvsKernel(self.netns)
        return self.kernel

    def _ensure_sysctls(self) -> dict[str, str]:
        """Set what the datapath needs, recording each previous value once (the
        first time svcproxy changes it) so cleanup can restore it. Returns what
        it wrote (name -> value)."""
        store = SysctlStore(self.backup_path, self.netns)
        return {name: value for name, value in self._wanted_sysctls().items()
                if store.ensure_or_warn(name, value)}

    @hookimpl
    def svcproxy_prepare_node(self, datapath: str) -> list[str] | None:
        if datapath != NAME:
            return None
        return [f"sysctl {name.replace('/', '.')}={value}"
                for name, value in self._ensure_sysctls().items()]

    @staticmethod
    def _wanted_sysctls() -> dict[str, str]:
        wanted = dict(SYSCTLS)
        if (4, 1) <= _kernel_version() < (5, 9):
            wanted["net/ipv4/vs/conn_reuse_mode"] = "0"
        return wanted

    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: ServiceMap, delta: PlanDelta,
                            full: bool) -> ApplyResult | None:
        if name != NAME:
            return None
        state = self._state()
        early = self._early_once(plan)
        # Sets and helper rules first: a VIP is in KUBE-IPVS-IPS (and so its
        # node-originated traffic masqueraded) before it is bound to kube-ipvs0.
        # A refused set member does not stop the rest: everything else is
        # written, the sync fails naming the refusals, and the retry (a full
        # sync, with back-off) reads back what was refused and tries again.
        helper_changes = 0
        refused: list[str] = []
        families = {4} | plan.families() | set(self.helpers)
        with phase("helpers"):
            for family in sorted(families):
                helper = self._helper(family)
                helper_changes += helper.sync(
                    plan, None if full else delta.changed, self._helper_options(family, plan))
                refused += helper.refused
        result = state.sync(plan, None if full else delta.changed)
        if full and not result.failures and not refused:
            # the IPVS datapath serves now: what iptables mode left can go
            with phase("leftovers"):
                helper_changes += self._remove_iptables_mode()
        _raise_refused(refused + result.failures)
        return ApplyResult(changes=result.batch_ops + result.bound + result.unbound
                           + helper_changes + early,
                           details={"bound": result.bound, "unbound": result.unbound,
                                    "drained": result.drained,
                                    "draining": len(state.draining)},
                           followup=bool(state.draining))

    @hookimpl
    def svcproxy_apply_first(self, name: str, plan: ServiceMap) -> ApplyResult | None:
        """Cold start: the priority Services' set members, helper chains,
        virtual servers and kube-ipvs0 addresses, compared only for their own
        frontends (the kernel is read first), so nothing else is touched; the
        full sync follows."""
        if name != NAME:
            return None
        state = self._state()
        # (its masquerade rule goes in sync_first's restore, moments later)
        changes = self._early_once(plan, write_rule=False)
        refused: list[str] = []
        with phase("helpers"):
            for family in sorted({4} | plan.families() | set(self.helpers)):
                helper = self._helper(family)
                changes += helper.sync_first(plan, self._helper_options(family, plan))
                refused += helper.refused
        result = state.sync(plan, list(plan.frontends), additive=True)
        _raise_refused(refused + result.failures)
        return ApplyResult(changes=changes + result.batch_ops + result.bound,
                           details={"bound": result.bound})

    def _early_once(self, plan: ServiceMap, write_rule: bool = True) -> int:
        """early masquerade before the first write of this datapath's life."""
        if self.early_done:
            return 0
        self.early_done = True  # (once, even if it fails: the sync writes the same)
        with phase("early"):
            return self._early_masquerade(plan, write_rule)

    def _remove_iptables_mode(self) -> int:
        removed = 0
        for family, helper in sorted(self.helpers.items()):
            try:
                n = helper.remove_iptables_mode()
            except KernelError as exc:
                # a leftover chain someone else still refers to: keep it
                log.warning("IPv%d: kube-proxy iptables-mode leftovers kept: %s", family, exc)
                continue
            if n:
                log.info("IPv%d: removed %d iptables-mode chains and jumps (kube-proxy "
                         "iptables mode's, unused by the IPVS datapath)", family, n)
            removed += n
        if not self.retired:
            # kube-proxy's nftables mode (or svcproxy's) left its tables: they go
            from svcproxy.plugins.nftables.datapath import retire_nftables

            for line in retire_nftables(self.netns):
                log.info("ipvs serves; removed the previous datapath's state: %s", line)
                removed += 1
            self.retired = True
        return removed

    def _early_masquerade(self, plan: ServiceMap, write_rule: bool = True) -> int:
        """The first thing written at start-up (HelperState.early); returns the
        number of changes."""
        bound = self._kernel().link.addresses()
        total = 0
        for family in sorted({4} | {ip_family(a) for a in bound}):
            wrote = self._helper(family).early(bound, self._helper_options(family, plan),
                                               write_rule)
            if wrote:
                log.info("IPv%d: masquerading node traffic from %d service VIPs already "
                         "on kube-ipvs0 before the first sync", family,
                         sum(1 for a in bound if ip_family(a) == family))
            total += wrote
        return total

    def _helper(self, family: int, warming: bool = False) -> HelperState:
        if not warming:
            self._warmed()
        if family not in self.helpers:
            from svcproxy.plugins.kernel.iptables import detect_backend

            backend, why = detect_backend(family, self.netns)
            if family == 4:
                log.info("iptables backend for the IPVS helper rules: %s (%s)", backend, why)
            self.helpers[family] = HelperState(Ipset(self.netns),
                                               IptablesKernel(family, backend, self.netns),
                                               family)
        return self.helpers[family]

    def _helper_options(self, family: int, plan: ServiceMap) -> HelperOptions:
        from svcproxy.plugins.iptables import rule_options

        ro = rule_options(self.config, family, plan)
        return HelperOptions(family=family, masquerade_bit=ro.masquerade_bit,
                             masquerade_all=ro.masquerade_all,
                             local_detector=ro.local_detector, node_ip=ro.node_ip)

    @hookimpl
    def svcproxy_preview_plan(self, name: str, plan: ServiceMap) -> list[str] | None:
        """A first full sync through preview doors (svcproxy.plugins.kernel.preview):
        a fresh reconciler reads this node's kernel and records its writes."""
        if name != NAME:
            return None
        from svcproxy.plugins.kernel.iptables import detect_backend
        from svcproxy.plugins.kernel.preview import (
            Changes,
            PreviewConntrack,
            PreviewIpset,
            PreviewIptables,
            PreviewIpvs,
            PreviewLink,
        )

        changes = Changes()
        store = SysctlStore(None, self.netns)
        for sysctl, value in self._wanted_sysctls().items():
            current = store.read(sysctl)
            if current is not None and current.strip() != value:
                changes.append(f"sysctl -w {sysctl.replace('/', '.')}={value} (is {current})")
        real = self._kernel()
        kernel = _PreviewKernel(PreviewIpvs(real.nl, changes), PreviewLink(real.link, changes),
                                PreviewConntrack(changes))
        state = IpvsState(kernel, self.options)
        helpers = []
        for family in sorted({4} | plan.families()):
            # the running datapath's backend, else what it would choose
            known = self.helpers.get(family)
            if known is not None and isinstance(known.ipt, IptablesKernel):
                backend = known.ipt.backend
            else:
                backend = detect_backend(family, self.netns)[0]
            command = "iptables" if family == 4 else "ip6tables"
            helper = HelperState(PreviewIpset(Ipset(self.netns), changes),
                                 PreviewIptables(IptablesKernel(family, backend, self.netns),
                                                 changes, command), family)
            helper.sync(plan, None, self._helper_options(family, plan))
            helpers.append(helper)
        state.sync(plan, None)
        for helper in helpers:
            helper.remove_iptables_mode()
        return list(changes)

    @hookimpl
    def svcproxy_render_plan(self, plan: ServiceMap, output: str) -> str | None:
        if output != "ipvsadm":
            return None
        table = {}
        for fe in plan.frontends.values():
            vs, rss = to_ipvs(fe)
            table[vs] = list(rss.values())
        return render_ipvsadm(table)

    def _remove_virtual_servers(self, kernel: IpvsKernel) -> list[str]:
        """Delete the virtual servers svcproxy owns (servers.py's rule: on
        kube-ipvs0, or NodePort-shaped), never those in excludeCIDRs or anybody
        else's (kube-proxy's cleanup flushes the whole table)."""
        state = IpvsState(kernel, self.options)
        bound, nodes = kernel.link.addresses(), state.node_addresses()
        removed, kept, failures = 0, 0, []
        # again until a listing finds none: a long dump can miss some while
        # another namespace's virtual servers go (IPVSNetlink.services)
        for _ in range(3):
            found = kernel.nl.services()
            owned = self._owned(state, found, bound, nodes)
            kept = len(found) - len(owned)
            if not owned:
                break
            batch = kernel.nl.batch()
            for vs in owned:
                batch.delete_service(vs)
            refused = batch.commit()
            removed += len(owned) - len(refused)
            failures = [f"ipvs: {f}" for f in refused]
            if refused:
                break
        lines = []
        if removed:
            lines.append(f"ipvs: removed {removed} virtual servers")
        if kept:
            lines.append(f"ipvs: kept {kept} virtual servers that are not "
                         "svcproxy's (not on kube-ipvs0, not NodePorts, or in excludeCIDRs)")
        return lines + failures

    @staticmethod
    def _owned(state: IpvsState, found: list[VirtualServer], bound: set[str],
               nodes: set[str]) -> list[VirtualServer]:
        return [vs for vs in found
                if state.owns(vs, bound, nodes) and not state.excluded(vs.address)]

    def retire(self) -> tuple[list[str], int]:
        """Another datapath serves now: remove the IPVS datapath's state without
        breaking a connection. A virtual server goes once its real servers hold
        no established connection or UDP flow (deleting it sooner would reset
        them: with expire_nodest_conn=1 IPVS drops a connection whose
        destination left; a TCP connection already closing may go);
        when none is left, so do kube-ipvs0 and the helper ipsets and chains.
        Returns what was removed and how many virtual servers still drain.
        New connections never reach them: the serving datapath DNATs first."""
        if not os.path.exists("/sys/module/ip_vs"):
            return [], 0  # not loaded, so nothing of IPVS anywhere (and not loaded by us)
        kernel = IpvsKernel(self.netns)
        try:
            try:
                kernel.nl  # noqa: B018 -- no IPVS here: nothing of IPVS mode to retire
            except OSError:
                return [], 0
            if kernel.link.index(create=False) is None:
                # no kube-ipvs0: IPVS mode never ran in this namespace, and
                # NodePort-shaped virtual servers here are someone else's
                # (keepalived's, say); an explicit `svcproxy cleanup` decides
                return [], 0
            return self._retire_servers(kernel)
        finally:
            kernel.close()

    def _retire_servers(self, kernel: IpvsKernel) -> tuple[list[str], int]:
        state = IpvsState(kernel, self.options)
        bound, nodes = kernel.link.addresses(), state.node_addresses()
        owned = self._owned(state, kernel.nl.services(), bound, nodes)
        dests = kernel.nl.dests_of(owned)
        # a TCP connection that is closing (inactive: FIN_WAIT, TIME_WAIT) may
        # go; a UDP flow is only ever "inactive" and must not
        busy = [vs for vs in owned
                if any(rs.active or (vs.protocol != "TCP" and rs.inactive)
                       for rs in dests.get(vs.key, ()))]
        idle = [vs for vs in owned if vs not in busy]
        lines: list[str] = []
        if idle:
            batch = kernel.nl.batch()
            for vs in idle:
                batch.delete_service(vs)
            failures = batch.commit()
            lines.append(f"ipvs: removed {len(idle) - len(failures)} virtual servers "
                         "without connections")
            lines += [f"ipvs: {f}" for f in failures]
            # a UDP flow idle past IPVS's timeout still has its conntrack
            # entry, which would deliver its next datagram to the VIP itself;
            # without the entry that datagram starts a new flow, which the
            # serving datapath DNATs
            flushed = sum(kernel.conntrack.delete(
                ["-p", vs.protocol.lower(), "--orig-dst", vs.address, "--orig-port-dst",
                 str(vs.port)], 6 if ":" in vs.address else 4)
                for vs in idle if vs.protocol != "TCP")
            if flushed:
                lines.append(f"ipvs: deleted {flushed} conntrack entries of idle UDP flows")
        if busy:
            return lines, len(busy)
        if idle and (left := self._owned(state, kernel.nl.services(), bound, nodes)):
            # a long dump can miss some while another namespace's virtual
            # servers go (IPVSNetlink.services): the next pass takes them
            return lines, len(left)
        lines += self._cleanup_helpers()
        if kernel.link.delete():
            lines.append("ipvs: removed kube-ipvs0")
        return lines, 0

    def _cleanup_helpers(self) -> list[str]:
        from svcproxy.plugins.kernel.iptables import detect_backend

        lines: list[str] = []
        for family in (4, 6):
            try:
                backend = detect_backend(family, self.netns)[0]
                helper = HelperState(Ipset(self.netns),
                                     IptablesKernel(family, backend, self.netns), family)
                lines += helper.cleanup()
            except Exception as exc:  # IPv6 tools may be missing
                log.debug("IPv%d helper cleanup skipped: %s", family, exc)
        return lines

    @hookimpl
    def svcproxy_cleanup_datapath(self) -> list[str]:
        lines: list[str] = []
        kernel = IpvsKernel(self.netns)
        try:
            kernel.nl  # noqa: B018 -- no IPVS here: nothing of IPVS mode to remove
        except OSError as exc:
            log.debug("IPVS cleanup skipped: %s", exc)
            kernel.close()
            return lines
        try:
            lines += self._cleanup_helpers()
            lines += self._remove_virtual_servers(kernel)
            if kernel.link.delete():
                lines.append("ipvs: removed kube-ipvs0")
            lines += SysctlStore(self.backup_path, self.netns).restore(
                [*SYSCTLS, "net/ipv4/vs/conn_reuse_mode"])
        finally:
            kernel.close()
        return lines


def retire_ipvs(config: Config, netns: str | None) -> tuple[list[str], int]:
    """IpvsPlugin.retire for a datapath that serves instead (nftables): what
    was removed, and how many virtual servers still hold connections."""
    plugin = IpvsPlugin()
    plugin.svcproxy_configure_plugin(config, {"netns": netns} if netns else {})
    return plugin.retire()
