"""Built-in datapath plugin `nftables`: kube-proxy's nftables-mode layout (tables
`ip kube-proxy` and `ip6 kube-proxy`), one transaction per sync.

Options, from ``datapathOptions.nftables`` in the SvcProxyConfiguration
(see docs/nftables.md):

- ``netns``: run every nft/conntrack command inside this network namespace
  (tests and benchmarks use a namespace as the "node").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from svcproxy import hookimpl
from svcproxy.config import Config
from svcproxy.datapath import ApplyResult, CheckItem, MetricSample, ProbeResult
from svcproxy.errors import PluginError
from svcproxy.ir import PlanDelta, ServiceMap, ip_family
from svcproxy.phases import phase
from svcproxy.plugins.iptables.datapath import rule_count
from svcproxy.plugins.kernel.conntrack import conntrack_samples
from svcproxy.plugins.kernel.nftables import NftKernel
from svcproxy.plugins.kernel.tools import KernelError

from .datapath import FamilyState, cleanup_family, render_nft, sync_family, sync_first
from .rules import NftOptions

log = logging.getLogger(__name__)

NAME = "nftables"
FORMAT = "nft"
#: seconds between looks at draining IPVS virtual servers
IPVS_RECHECK = 5.0


def nft_options(config: Config, family: int, plan: ServiceMap | None = None) -> NftOptions:
    """Rendering settings from the KubeProxyConfiguration (and the node's
    addresses), read as the iptables datapath reads them."""
    from svcproxy.plugins.iptables import local_traffic, node_port_ips

    kp = config.kube_proxy
    local = local_traffic(config, family, plan)
    detector = None if local is None else {
        "cidr": ("saddr", local[1]), "iface": ("iifname", local[1]),
        "prefix": ("iifname", local[1] + "*")}[local[0]]
    return NftOptions(family=family, masquerade_bit=kp.masquerade_bit,
                      masquerade_all=kp.masquerade_all, local_detector=detector,
                      node_port_ips=node_port_ips(config, family,
                                                  plan if plan is not None else ServiceMap()),
                      node_ip=plan.primary_ip(family) if plan is not None else None)


class NftablesPlugin:
    def __init__(self) -> None:
        self.config = Config()
        self.netns: str | None = None
        self.families: dict[int, FamilyState] = {}
        #: families nftables cannot program here, with the reason (logged once)
        self.unusable: dict[int, str] = {}
        self.ipv6_probed = False
        self.active = False
        #: the iptables datapath's rules were removed after a first full sync
        self.retired = False
        #: the namespace's ruleset generation after svcproxy's last commit, as
        #: long as every commit since its last read was its own (None: unknown)
        self.generation: int | None = None
        #: IPVS virtual servers still holding connections (None: not looked at
        #: yet), and when they were last looked at
        self.ipvs_left: int | None = None
        self.ipvs_checked = 0.0

    @hookimpl
    def svcproxy_configure_plugin(self, config: Config, options: Mapping[str, Any]) -> None:
        self.config = config
        opts = dict(options)
        unknown = sorted(set(opts) - {"netns"})
        if unknown:
            raise PluginError(f"nftables: unknown option {unknown[0]!r} (options: netns)")
        netns = opts.get("netns")
        if netns is not None and not isinstance(netns, str):
            raise PluginError(f"nftables: netns must be a namespace name (got {netns!r})")
        self.netns = netns

    def _family(self, family: int) -> FamilyState:
        if family not in self.families:
            self.families[family] = FamilyState(NftKernel(family, self.netns))
        return self.families[family]

    # -- datapath hooks -----------------------------------------------------------

    @hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [NAME]

    @hookimpl
    def svcproxy_list_plan_formats(self) -> list[str]:
        return [FORMAT]

    @hookimpl
    def svcproxy_render_plan(self, name: str, plan: ServiceMap, output: str) -> str | None:
        if output != FORMAT:
            return None
        families = sorted({f.family for f in plan.frontends.values()} | {4})
        return "".join(render_nft(plan, nft_options(self.config, family, plan))
                       for family in families)

    @hookimpl
    def svcproxy_probe_datapath(self, name: str) -> ProbeResult | None:
        if name != NAME:
            return None
        if self.active and self.families and all(s.known for s in self.families.values()):
            # serving: its own transactions are the probe (a throwaway commit
            # would move the ruleset generation and force full syncs to list)
            return ProbeResult.ok()
        from .status import kernel_requirement

        reason = kernel_requirement()
        if not reason:
            try:
                reason = NftKernel(4, self.netns).available() or ""
            except KernelError as exc:
                reason = str(exc)
        return ProbeResult.unusable(reason) if reason else ProbeResult.ok()

    @hookimpl
    def svcproxy_check(self) -> list[CheckItem]:
        from .status import nftables_checks

        return nftables_checks(self.netns)

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str) -> None:
        self.active = datapath == NAME

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str) -> None:
        """Active again (or for the first time) while running: start from
        scratch, and retire the previous datapath's state once this one serves."""
        self.active = datapath == NAME
        if self.active:
            self._close()
            self.retired = False
            self.ipvs_left = None
            self.generation = None

    @hookimpl
    def svcproxy_stop_proxy(self) -> None:
        self._close()

    def _close(self) -> None:
        """Forget the families' state and close their netlink sockets."""
        for state in self.families.values():
            state.kernel.close()
        self.families.clear()

    @hookimpl
    def svcproxy_datapath_status(self, name: str) -> dict[str, Any] | None:
        if name != NAME:
            return None
        from .status import nftables_status

        return nftables_status([NftKernel(f, self.netns) for f in (4, 6)])

    @hookimpl
    def svcproxy_render_status(self, name: str, view: Mapping[str, Any]) -> str | None:
        if name != NAME:
            return None
        from .status import render_nftables

        return render_nftables(view)

    @hookimpl
    def svcproxy_collect_metrics(self) -> list[MetricSample] | None:
        if not self.active:
            return None
        out = conntrack_samples(self.netns)
        for family, state in sorted(self.families.items()):
            if not state.chains.known:
                continue
            rules = sum(rule_count(c[1]) for c in state.chains.have.values())
            out.append(MetricSample("svcproxy_nftables_rules",
                                    "Rules in svcproxy's nftables table",
                                    float(rules), {"ip_family": f"IPv{family}"}))
            out.append(MetricSample("svcproxy_nftables_chains",
                                    "Chains in svcproxy's nftables table",
                                    float(len(state.chains.have)), {"ip_family": f"IPv{family}"}))
            out.append(MetricSample("svcproxy_nftables_elements",
                                    "Map and set elements in svcproxy's nftables table",
                                    float(len(state.elements.have)),
                                    {"ip_family": f"IPv{family}"}))
        return out

    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: ServiceMap, delta: PlanDelta,
                            full: bool) -> ApplyResult | None:
        if name != NAME:
            return None
        # (a partial sync looks only at what changed: every frontend of 50,000
        # services is 40 ms of Python at 10,000)
        families = {4} | set(self.families) | (
            {f.family for f in plan.frontends.values()} if full else
            {ip_family(k.address) for k in delta.changed})
        changes = repaired = conntrack = 0
        followup = False
        details: dict[str, object] = {}
        # (its first probe commits: before the mark; only once IPv6 is wanted)
        v6 = 6 in families and self._ipv6_usable()
        mark = self._mark()
        trusted = mark[0] is not None and mark[0] == self.generation
        self.generation = None  # unknown until this apply is done
        for family in sorted(families):
            if family == 6 and not v6:
                continue
            state = self._family(family)
            changed = None if full else [k for k in delta.changed
                                         if ip_family(k.address) == family]
            if changed is not None and not changed and state.known and not state.stale:
                continue
            opts = nft_options(self.config, family, plan)
            try:
                with phase(f"ipv{family}"):
                    res = sync_family(state, plan, changed, opts, trusted)
            except KernelError as exc:
                raise KernelError(f"IPv{family}: {exc}") from None
            changes += res.changes
            repaired += res.changes if full else 0
            conntrack += res.conntrack_deleted
            followup = followup or res.followup
            details[f"ipv{family}"] = {
                "chains_written": res.chains_written, "chains_flushed": res.chains_flushed,
                "chains_deleted": res.chains_deleted, "elements": res.elements,
                "sets": res.sets, "rebuilt": res.rebuilt, "transactions": res.transactions,
                "listed": res.listed}
        details["conntrack_deleted"] = conntrack
        # every commit since the mark svcproxy's own, and the stores were
        # trusted or read after it: the tables are what the stores say
        end = self._only_ours_since(mark)
        if end is not None and (trusted or full):
            self.generation = end
        if full and not self.retired:
            details["retired"] = self._retire()
        first_look = self.ipvs_left is None and full
        again = bool(self.ipvs_left) and time.monotonic() - self.ipvs_checked >= IPVS_RECHECK
        if first_look or again:
            details["ipvs_retired"] = self._retire_ipvs()
        if self.ipvs_left:
            followup = True
            details["ipvs_draining"] = self.ipvs_left
        return ApplyResult(changes=changes, repaired=repaired, details=details,
                           followup=followup)

    @hookimpl
    def svcproxy_apply_first(self, name: str, plan: ServiceMap) -> ApplyResult | None:
        """Cold start: the priority Services' chains, sets and elements added
        to each family's table (datapath.sync_first); the full sync follows
        and, if nobody else committed meanwhile, lists nothing again."""
        if name != NAME:
            return None
        families = {f.family for f in plan.frontends.values()} | {4}
        v6 = 6 in families and self._ipv6_usable()  # (as in svcproxy_apply_plan)
        mark = self._mark()
        self.generation = None
        changes = 0
        read = True
        for family in sorted(families):
            if family == 6 and not v6:
                continue
            state = self._family(family)
            read = read and not state.known
            try:
                with phase(f"ipv{family}"):
                    res = sync_first(state, plan, nft_options(self.config, family, plan))
            except KernelError as exc:
                raise KernelError(f"IPv{family}: {exc}") from None
            if res is None:
                return None
            changes += res.changes
        end = self._only_ours_since(mark)
        if read and end is not None:  # the stores were read after the mark
            self.generation = end
        return ApplyResult(changes=changes)

    def _mark(self) -> tuple[int | None, int]:
        """The ruleset generation now, and how many transactions svcproxy has
        committed so far."""
        return (self._family(4).kernel.generation(),
                sum(s.kernel.transactions for s in self.families.values()))

    def _only_ours_since(self, mark: tuple[int | None, int]) -> int | None:
        """The generation now, if every commit since `mark` was svcproxy's."""
        start, commits = mark
        end = self._family(4).kernel.generation()
        ours = sum(s.kernel.transactions for s in self.families.values()) - commits
        return end if start is not None and end is not None and end - start == ours else None

    def _retire_ipvs(self) -> list[str]:
        """What the IPVS datapath left goes as its connections end: each
        virtual server once it holds none, then kube-ipvs0 and the helper sets
        and chains. Until then its established connections keep flowing
        through IPVS while nftables DNATs every new one first."""
        from svcproxy.plugins.ipvs import retire_ipvs

        self.ipvs_checked = time.monotonic()
        try:
            with phase("retire-ipvs"):
                lines, left = retire_ipvs(self.config, self.netns)
        except Exception as exc:  # logged, tried again later
            log.warning("could not retire the IPVS datapath's state (tried again later): %s",
                        exc)
            self.ipvs_left = self.ipvs_left or 1
            return []
        if left and self.ipvs_left is None:
            log.info("nftables serves; %d IPVS virtual servers keep their connections and go "
                     "when those end", left)
        self.ipvs_left = left
        for line in lines:
            log.info("nftables serves; removed the previous datapath's state: %s", line)
        return lines

    def _retire(self) -> list[str]:
        """nftables serves now: what the iptables datapath (or kube-proxy's
        iptables mode) left can go. Connections it set up keep their conntrack
        NAT. A failure is logged and tried again at the next full sync."""
        from svcproxy.plugins.iptables.datapath import retire_iptables_mode

        try:
            with phase("retire"):
                lines = retire_iptables_mode(self.netns)
        except KernelError as exc:
            log.warning("could not remove the iptables datapath's rules (tried again at "
                        "the next full sync): %s", exc)
            return []
        self.retired = True
        for line in lines:
            log.info("nftables serves; removed the previous datapath's state: %s", line)
        return lines

    def _ipv6_usable(self) -> bool:
        """Probed once (the probe commits a throwaway table, which moves the
        ruleset generation: not on every sync)."""
        if 6 not in self.unusable and 6 not in self.families and not self.ipv6_probed:
            try:
                reason = NftKernel(6, self.netns).available()
            except KernelError as exc:
                reason = str(exc)
            self.ipv6_probed = True
            if reason:
                self.unusable[6] = reason
                log.warning("IPv6 frontends are not programmed: %s", reason)
        return 6 not in self.unusable

    @hookimpl
    def svcproxy_preview_plan(self, name: str, plan: ServiceMap) -> list[str] | None:
        """A first full sync per family against this node's tables, through a
        door that records the transaction instead of committing it."""
        if name != NAME:
            return None
        from .status import PreviewNft

        changes: list[str] = []
        families = {f.family for f in plan.frontends.values()} | {4}
        for family in sorted(families):
            if family == 6 and not self._ipv6_usable():
                continue
            kernel = PreviewNft(NftKernel(family, self.netns), changes)
            sync_family(FamilyState(kernel), plan, None,  # type: ignore[arg-type]
                        nft_options(self.config, family, plan))
        return changes

    @hookimpl
    def svcproxy_cleanup_datapath(self) -> list[str]:
        lines: list[str] = []
        for family in (4, 6):
            try:
                lines += cleanup_family(NftKernel(family, self.netns))
            except KernelError as exc:
                if family == 4:
                    raise
                log.debug("IPv6 cleanup skipped: %s", exc)
        return lines
