"""Built-in datapath plugin `iptables`: kube-proxy's iptables-mode layout, the
automatic fallback when IPVS cannot run.

Options, from ``datapathOptions.iptables`` in the SvcProxyConfiguration
(see docs/iptables.md):

- ``backend``: ``auto`` (default; the backend the host already uses, as
  kube-proxy decides it), ``nft`` or ``legacy``;
- ``netns``: run every iptables/conntrack command inside this network
  namespace (tests and benchmarks use a namespace as the "node").
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from svcproxy import hookimpl
from svcproxy.config import Config
from svcproxy.datapath import ApplyResult, CheckItem, MetricSample, ProbeResult
from svcproxy.errors import PluginError
from svcproxy.ir import PlanDelta, ServiceMap, ip_family
from svcproxy.phases import phase
from svcproxy.plugins.kernel.conntrack import conntrack_samples
from svcproxy.plugins.kernel.iptables import BACKENDS, IptablesKernel, detect_backend
from svcproxy.plugins.kernel.sysctl import DEFAULT_BACKUP, SysctlStore
from svcproxy.plugins.kernel.tools import KernelError

from .datapath import (
    FamilyState,
    cleanup_family,
    render_iptables_save,
    rule_count,
    sync_family,
    sync_first,
)
from .rules import RuleOptions

log = logging.getLogger(__name__)

NAME = "iptables"
FORMAT = "iptables-save"


def local_traffic(config: Config, family: int, plan: ServiceMap | None
                  ) -> tuple[str, str] | None:
    """detectLocalMode for one family, as the netfilter datapaths use it:
    ("cidr", CIDR), ("iface", name) or ("prefix", name prefix); None when
    there is nothing to detect by (like kube-proxy without a cluster CIDR or
    a Node podCIDR of the family)."""
    kp = config.kube_proxy
    mode = kp.effective_detect_local_mode
    if mode in ("ClusterCIDR", "NodeCIDR"):
        # NodeCIDR: the Node's spec.podCIDRs
        cidrs = kp.cluster_cidr if mode == "ClusterCIDR" else \
            (plan.node_pod_cidrs if plan is not None else ())
        cidr = next((c for c in cidrs
                     if ipaddress.ip_network(c, strict=False).version == family), None)
        return ("cidr", str(ipaddress.ip_network(cidr, strict=False))) if cidr else None
    if mode == "BridgeInterface":
        return ("iface", kp.detect_local.bridge_interface)
    if mode == "InterfaceNamePrefix":
        return ("prefix", kp.detect_local.interface_name_prefix)
    return None


def node_port_ips(config: Config, family: int, plan: ServiceMap | None
                  ) -> tuple[str, ...] | None:
    """The node addresses NodePorts answer on (nodePortAddresses applied), or
    None for every local address."""
    setting = list(config.kube_proxy.effective_node_port_addresses)
    if not setting or setting == ["all"] or plan is None:
        return None
    return tuple(a for a in plan.node_port_ips if ip_family(a) == family)


def rule_options(config: Config, family: int, plan: ServiceMap | None = None) -> RuleOptions:
    """Rendering settings from the KubeProxyConfiguration (and the node's addresses)."""
    kp = config.kube_proxy
    local = local_traffic(config, family, plan)
    detector = None if local is None else {
        "cidr": ("-s", local[1]), "iface": ("-i", local[1]),
        "prefix": ("-i", local[1] + "+")}[local[0]]
    return RuleOptions(family=family, masquerade_bit=kp.masquerade_bit,
                       masquerade_all=kp.masquerade_all, local_detector=detector,
                       tcp_be_liberal=kp.conntrack.tcp_be_liberal,
                       node_port_addresses=node_port_ips(config, family, plan),
                       node_ip=plan.primary_ip(family) if plan is not None else None,
                       localhost_node_ports=kp.iptables.localhost_node_ports)


ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"

#: how many chain names a sync's details list (the totals count them all): the
#: proxy keeps its last result, and a first sync at 10,000 services wrote
#: 60,000 chains, 5 MB of names
DETAIL_NAMES = 100


def _names(keys: list[tuple[str, str]]) -> list[str]:
    return [f"{t}/{c}" for t, c in keys[:DETAIL_NAMES]]


class IptablesPlugin:
    def __init__(self) -> None:
        self.config = Config()
        self.backend_setting = "auto"
        self.netns: str | None = None
        self.backend: str | None = None
        self.families: dict[int, FamilyState] = {}
        #: families whose tools do not work here, with the reason (logged once)
        self.unusable: dict[int, str] = {}
        self.active = False
        self.sysctls = SysctlStore()
        self.localnet_set = False
        #: the nftables datapath's tables were removed after a first full sync
        self.retired = False

    # -- configuration -----------------------------------------------------------

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config, options: Mapping[str, Any]) -> None:
        self.config = config
        opts = dict(options)
        unknown = sorted(set(opts) - {"backend", "netns", "sysctlBackup"})
        if unknown:
            raise PluginError(f"iptables: unknown option {unknown[0]!r} "
                              "(options: backend, netns, sysctlBackup)")
        backend = opts.get("backend", "auto")
        if backend not in ("auto", *BACKENDS):
            raise PluginError(f"iptables: backend must be auto, nft or legacy (got {backend!r})")
        self.backend_setting = backend
        netns = opts.get("netns")
        if netns is not None and not isinstance(netns, str):
            raise PluginError(f"iptables: netns must be a namespace name (got {netns!r})")
        self.netns = netns
        # a throwaway namespace's old values are not recorded unless asked
        backup = opts.get("sysctlBackup", None if netns else DEFAULT_BACKUP)
        self.sysctls = SysctlStore(str(backup) if backup else None, netns)

    def _backend(self) -> str:
        if self.backend is None:
            if self.backend_setting == "auto":
                self.backend, why = detect_backend(4, self.netns)
                log.info("iptables backend: %s (%s)", self.backend, why)
            else:
                self.backend = self.backend_setting
        return self.backend

    def _family(self, family: int) -> FamilyState:
        if family not in self.families:
            kernel = IptablesKernel(family, self._backend(), self.netns)
            self.families[family] = FamilyState(kernel)
        return self.families[family]

    # -- datapath hooks -----------------------------------------------------------

    @hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [NAME]

    @hookimpl
    def svcproxy_list_plan_formats(self) -> list[str]:
        return [FORMAT]

    @hookimpl
    def svcproxy_datapath_status(self, name: str) -> dict[str, Any] | None:
        if name != NAME:
            return None
        from .status import iptables_status

        kernels = [IptablesKernel(4, self._backend(), self.netns)]
        if IptablesKernel(6, self._backend(), self.netns).available() is None:
            kernels.append(IptablesKernel(6, self._backend(), self.netns))
        return iptables_status(kernels)

    @hookimpl
    def svcproxy_render_status(self, name: str, view: Mapping[str, Any]) -> str | None:
        """New connections per service and per endpoint, from the rule counters."""
        if name != NAME:
            return None
        from .status import render_iptables

        return render_iptables(view)

    @hookimpl
    def svcproxy_check(self) -> list[CheckItem]:
        from .status import conntrack_checks, safe_checks

        if self.backend_setting == "auto":
            backend, why = detect_backend(4, self.netns)
        else:
            backend, why = self.backend_setting, "configured"
        items = []
        for family in (4, 6):
            items += safe_checks(IptablesKernel(family, backend, self.netns), why, self.netns)
        return items + conntrack_checks(self.netns)

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str) -> None:
        self.active = datapath == NAME

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str) -> None:
        """Active again (or for the first time) while running: start from
        scratch, and retire the previous datapath's state once this one serves."""
        self.active = datapath == NAME
        if self.active:
            self.families.clear()
            self.retired = False

    @hookimpl
    def svcproxy_collect_metrics(self) -> list[MetricSample] | None:
        """kube-proxy's rule gauges, and conntrack usage."""
        if not self.active:
            return None
        out = conntrack_samples(self.netns)
        for family, state in sorted(self.families.items()):
            per_table: dict[str, int] = {}
            for (table, _), d in (state.written or {}).items():
                per_table[table] = per_table.get(table, 0) + rule_count(d)
            for table, n in sorted(per_table.items()):
                out.append(MetricSample("kubeproxy_sync_proxy_rules_iptables_total",
                                        "Total number of iptables rules owned by kube-proxy",
                                        float(n), {"table": table, "ip_family": f"IPv{family}"}))
        return out

    @hookimpl
    def svcproxy_probe_datapath(self, name: str) -> ProbeResult | None:
        if name != NAME:
            return None
        try:
            reason = IptablesKernel(4, self._backend(), self.netns).available()
        except KernelError as exc:
            reason = str(exc)
        return ProbeResult.unusable(reason) if reason else ProbeResult.ok()

    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: ServiceMap, delta: PlanDelta,
                            full: bool) -> ApplyResult | None:
        if name != NAME:
            return None
        # (a partial sync looks only at what changed, not at every frontend)
        families = {4} | set(self.families) | (
            {f.family for f in plan.frontends.values()} if full else
            {ip_family(k.address) for k in delta.changed})
        written = deleted = jumps = conntrack = 0
        details: dict[str, object] = {}
        for family in sorted(families):
            if family == 6 and not self._ipv6_usable():
                continue
            state = self._family(family)
            changed = None if full else [k for k in delta.changed
                                         if ip_family(k.address) == family]
            if changed is not None and not changed and state.written is not None:
                continue
            opts = rule_options(self.config, family, plan)
            if opts.localnet and not self.localnet_set:
                # NodePorts on 127.0.0.1 need the kernel to route loopback
                # sources (kube-proxy sets it too; svcproxy restores it on cleanup)
                self.sysctls.ensure_or_warn(ROUTE_LOCALNET, "1")
                self.localnet_set = True
            try:
                with phase(f"ipv{family}"):
                    res = sync_family(state, plan, changed, opts)
            except KernelError as exc:
                raise KernelError(f"IPv{family}: {exc}") from None
            written += len(res.written)
            deleted += len(res.deleted)
            jumps += res.jumps
            conntrack += res.conntrack_deleted
            details[f"ipv{family}"] = {
                "written": _names(res.written), "written_total": len(res.written),
                "deleted": _names(res.deleted), "deleted_total": len(res.deleted)}
        details["conntrack_deleted"] = conntrack
        details["backend"] = self.backend
        if full and not self.retired:
            # iptables serves now: the nftables datapath's tables can go
            from svcproxy.plugins.nftables.datapath import retire_nftables

            with phase("retire"):
                retired = retire_nftables(self.netns)
            for line in retired:
                log.info("iptables serves; removed the previous datapath's state: %s", line)
            details["retired"] = retired
            self.retired = True
        return ApplyResult(changes=written + deleted + jumps, repaired=0 if not full else
                           written + deleted + jumps, details=details)

    @hookimpl
    def svcproxy_apply_first(self, name: str, plan: ServiceMap) -> ApplyResult | None:
        """Cold start: the priority Services' chains, added to what each
        family's tables hold (datapath.sync_first); the full sync follows."""
        if name != NAME:
            return None
        changes = 0
        for family in sorted({f.family for f in plan.frontends.values()} | {4}):
            if family == 6 and not self._ipv6_usable():
                continue
            opts = rule_options(self.config, family, plan)
            try:
                with phase(f"ipv{family}"):
                    res = sync_first(self._family(family), plan, opts)
            except KernelError as exc:
                raise KernelError(f"IPv{family}: {exc}") from None
            changes += len(res.written) + res.jumps
        return ApplyResult(changes=changes)

    @hookimpl
    def svcproxy_preview_plan(self, name: str, plan: ServiceMap) -> list[str] | None:
        """A first full sync per family through preview doors: a fresh state
        reads this node's rules and records the restore it would run."""
        if name != NAME:
            return None
        from svcproxy.plugins.kernel.preview import Changes, PreviewIptables

        changes = Changes()
        families = {f.family for f in plan.frontends.values()} | {4}
        for family in sorted(families):
            if family == 6 and not self._ipv6_usable():
                continue
            opts = rule_options(self.config, family, plan)
            if opts.localnet:
                current = self.sysctls.read(ROUTE_LOCALNET)
                if current is not None and current.strip() != "1":
                    changes.append(f"sysctl -w {ROUTE_LOCALNET.replace('/', '.')}=1 "
                                   f"(is {current.strip()})")
            command = "iptables" if family == 4 else "ip6tables"
            kernel = PreviewIptables(IptablesKernel(family, self._backend(), self.netns),
                                     changes, command)
            sync_family(FamilyState(kernel), plan, None, opts)  # type: ignore[arg-type]
        return list(changes)

    def _ipv6_usable(self) -> bool:
        # Like kube-proxy, run single-stack when ip6tables cannot work here
        # rather than failing every sync.
        if 6 not in self.unusable and 6 not in self.families:
            reason = IptablesKernel(6, self._backend(), self.netns).available()
            if reason:
                self.unusable[6] = reason
                log.warning("IPv6 frontends are not programmed: %s", reason)
        return 6 not in self.unusable

    @hookimpl
    def svcproxy_render_plan(self, name: str, plan: ServiceMap, output: str) -> str | None:
        if output != FORMAT:
            return None
        families = sorted({f.family for f in plan.frontends.values()} | {4})
        parts = []
        for family in families:
            text = render_iptables_save(plan, rule_options(self.config, family, plan))
            tool = "iptables-save" if family == 4 else "ip6tables-save"
            parts.append(f"# {tool}\n{text}")
        return "".join(parts)

    @hookimpl
    def svcproxy_prepare_node(self, datapath: str) -> list[str] | None:
        """route_localnet for NodePorts on 127.0.0.1 (localhostNodePorts, on by
        default), as kube-proxy sets it at start."""
        if datapath != NAME or not rule_options(self.config, 4, ServiceMap()).localnet:
            return None
        if self.sysctls.ensure_or_warn(ROUTE_LOCALNET, "1"):
            return [f"sysctl {ROUTE_LOCALNET.replace('/', '.')}=1"]
        return []

    @hookimpl
    def svcproxy_cleanup_datapath(self) -> list[str]:
        lines: list[str] = self.sysctls.restore([ROUTE_LOCALNET])
        for family in (4, 6):
            kernel = IptablesKernel(family, self._backend(), self.netns)
            try:
                lines += cleanup_family(kernel)
            except KernelError as exc:
                if family == 4:
                    raise
                log.debug("IPv6 cleanup skipped: %s", exc)
        return lines

