"""Every hook svcproxy calls, grouped by lifecycle phase.

A plugin is any object or module with functions named like these specs and
marked `@hookimpl` (``from svcproxy import hookimpl``). Plugins are called in the
order the config lists them. Hooks marked firstresult stop at the first plugin
that returns something other than None; that answer wins.

All hooks are called with keyword arguments; an implementation may accept any
subset of the parameters (pluggy passes only the ones it names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .bus import Event
    from .config import Config
    from .datapath import (
        ApplyResult,
        CheckItem,
        MetricSample,
        ProbeResult,
        SyncResult,
        WatchedKind,
    )
    from .ir import Frontend, PlanDelta, ServiceMap
    from .manager import PluginHost
    from .plan import PortContext

PROJECT = "svcproxy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- configuration ---------------------------------------------------------------

@hookspec
def svcproxy_configure_plugin(config: Config, options: Mapping[str, Any]) -> None:
    """Called once per plugin at start-up, before anything else, with the options
    the config gives this plugin (``plugins[].options``; empty when none).

    Called for each plugin separately, so `options` is always the plugin's own.
    Raise ``svcproxy.errors.PluginError`` (or ValueError) for a bad option: the
    message is shown with the config file and the option's field path, and the
    process exits 2.
    """


# ---- lifecycle ---------------------------------------------------------------------

@hookspec
def svcproxy_start_proxy(config: Config, datapath: str,
                         skipped: Sequence[tuple[str, str]], node: str,
                         host: PluginHost) -> None:
    """Called once when `svcproxy run` has chosen its datapath, before the first
    sync, with the datapaths skipped on the way and why ((name, reason) pairs),
    the name of the node it proxies for, and the plugin host (to call other
    hooks, e.g. `host.collect_metrics()`). Start servers or threads here
    (metrics, health checks)."""


@hookspec
def svcproxy_datapath_changed(config: Config, datapath: str, previous: str,
                              reason: str) -> None:
    """`svcproxy run` switched datapaths while running (a datapath earlier in
    the order became usable, say the IPVS modules appeared, or the active one
    stopped working): `datapath` is active from the next sync on, a full one.
    Datapath plugins follow which one is active (the new one brings itself up
    from scratch and, once it serves, retires what `previous` left); observers
    update what they report."""


@hookspec
def svcproxy_stop_proxy() -> None:
    """Called once when `svcproxy run` stops (SIGTERM, SIGINT or --once done).
    Stop what svcproxy_start_proxy started; kernel rules stay in place."""


# ---- events --------------------------------------------------------------------------

@hookspec
def svcproxy_watch_kinds() -> Sequence[WatchedKind] | None:
    """Return the resource kinds, besides Services, EndpointSlices and Nodes,
    this plugin wants from the sources (`svcproxy.datapath.WatchedKind`: kind,
    API group/version/plural, a parser). Called once when `svcproxy run` starts
    its sources; the objects arrive through `svcproxy_observe_event` (they do not
    gate the first sync and never reach the planner)."""


@hookspec
def svcproxy_observe_event(event: Event) -> None:
    """Called for every cluster event (ADDED/MODIFIED/DELETED of a Service,
    EndpointSlice or Node) after it has been parsed, before the state changes.
    For observation only: the return value is ignored."""


# ---- planning ------------------------------------------------------------------------

@hookspec
def svcproxy_list_node_addresses(config: Config, family: int) -> Sequence[str] | None:
    """Return this node's own IP addresses of `family` (4 or 6), as found on the
    host, for NodePort frontends and for deciding which addresses are already
    local. Called by `svcproxy run`, never by `svcproxy plan` (a dry run must not
    depend on the machine it runs on; it uses the Node object's addresses).

    firstresult: the first non-None answer wins; with no answer the addresses
    in the Node object's status are used.
    """


@hookspec
def svcproxy_build_frontends(port: PortContext) -> Sequence[Frontend] | None:
    """Return the frontends this plugin contributes for one service port in one
    IP family (for example the ClusterIP, one NodePort frontend per node address).

    `port` carries the Service, the ServicePort, the IP family, the endpoints
    already selected by kube-proxy's rules (`port.backends_for(policy)`) and the
    plan context (config, node, node addresses). Every plugin's answer is
    collected; return None or [] to contribute nothing.
    """


@hookspec
def svcproxy_adjust_frontend(frontend: Frontend, port: PortContext) -> Frontend | None:
    """Called for every built frontend, plugin by plugin in config order; return
    a changed copy (``dataclasses.replace``) to replace it, or None to keep it.
    Each plugin sees the previous plugin's result. Used for session affinity,
    schedulers, weights."""


# ---- datapaths -----------------------------------------------------------------------

@hookspec
def svcproxy_list_datapaths() -> Sequence[str] | None:
    """Return the names of the datapaths this plugin implements (e.g. ["ipvs"])."""


@hookspec(firstresult=True)
def svcproxy_probe_datapath(name: str, config: Config) -> ProbeResult | None:
    """Check whether datapath `name` can run on this node. The plugin that
    implements `name` answers with a ProbeResult (usable, or not and why, in words
    a user can act on); others return None.

    firstresult: exactly one plugin implements a datapath, so the first answer wins.
    """


@hookspec(firstresult=True)
def svcproxy_apply_plan(name: str, plan: ServiceMap, delta: PlanDelta,
                        full: bool) -> ApplyResult | None:
    """Make the kernel match `plan` with datapath `name`; only its plugin answers.

    `delta` lists the frontends created, updated and deleted since the last
    successful apply. A partial apply (full=False) touches only those; a full
    apply (full=True) reconciles everything against the kernel and repairs drift.
    Raise on failure: the previous rules must stay in place (apply atomically),
    and the core retries with backoff.

    firstresult: only the active datapath's plugin answers.
    """


@hookspec(firstresult=True)
def svcproxy_apply_first(name: str, plan: ServiceMap) -> ApplyResult | None:
    """Cold start: program the frontends of `plan` with datapath `name` before
    the rest, without removing or changing anything else the kernel holds.

    Called on a datapath's first sync of a large cluster (at least
    coldStart.minServices Services) with a plan of the few Services a node
    needs before all others (the API server's, the cluster DNS); the full
    apply of the whole plan follows at once. Additive: rules, servers or set
    members the kernel already holds (a restart, a takeover) stay, so a
    restart never loses what serves. A datapath that cannot write that way
    returns None (the core then goes straight to the full apply). A raise is
    logged and the full apply still runs.

    firstresult: only the active datapath's plugin answers.
    """


@hookspec(firstresult=True)
def svcproxy_preview_plan(name: str, plan: ServiceMap) -> Sequence[str] | None:
    """What a first full sync of datapath `name` to `plan` would change in this
    node's kernel, one line per change, without changing anything (`svcproxy
    plan --against-kernel`): the datapath reads the kernel as its first sync
    does and reports the writes it would make. Empty: the kernel already holds
    `plan` (a node taken over from kube-proxy with current state).

    firstresult: only the named datapath's plugin answers.
    """


@hookspec(firstresult=True)
def svcproxy_render_plan(name: str, plan: ServiceMap, output: str) -> str | None:
    """Render `plan` as datapath `name` would program it, in format `output`
    (e.g. "ipvsadm", "iptables-save"), without touching the kernel. The plugin
    that knows the format answers; others return None.

    firstresult: the first plugin that knows the format wins.
    """


@hookspec
def svcproxy_list_plan_formats() -> Sequence[str] | None:
    """Return the extra `svcproxy plan --output` formats this plugin renders."""


@hookspec(firstresult=True)
def svcproxy_datapath_status(name: str, frontends: Mapping[tuple[str, int, str],
                                                           Mapping[str, Any]],
                             connections: bool) -> Mapping[str, Any] | None:
    """`svcproxy status`: the live kernel view of datapath `name` as JSON-able
    data (`svcproxy status -o json`; docs/observability.md), each kernel object
    labelled from `frontends` (plan frontends in their JSON form, by (address,
    port, protocol); empty when unknown). `connections`: include the
    connection table. The plugin that implements `name` answers; others return
    None."""


@hookspec(firstresult=True)
def svcproxy_render_status(name: str, view: Mapping[str, Any], stats: bool, rate: bool,
                           connections: bool) -> str | None:
    """`svcproxy status` as text: datapath `name`'s view (what its
    svcproxy_datapath_status returned) rendered for a terminal, with counters
    (`stats`), rates (`rate`) or the connection table (`connections`). The
    plugin that implements `name` answers; the first answer wins."""


@hookspec
def svcproxy_check(config: Config) -> Sequence[CheckItem] | None:
    """`svcproxy check`: prerequisites and health facts this plugin knows about
    (kernel modules, tools and versions, sysctls, table usage), each with the
    command that fixes a problem and the datapaths it blocks."""


@hookspec
def svcproxy_prepare_node(config: Config, datapath: str) -> Sequence[str] | None:
    """Set what the node needs that a container without privileges cannot:
    sysctls (a non-privileged container's /proc/sys is read-only) and kernel
    modules, for the datapath that will run (`svcproxy prepare`, run by the
    DaemonSet's privileged init container). What `run` finds already right it
    leaves alone. Return lines describing what was set."""


@hookspec
def svcproxy_cleanup_datapath(config: Config) -> Sequence[str] | None:
    """Remove everything this plugin created in the kernel (`svcproxy cleanup`),
    and nothing else. Return lines describing what was removed."""


# ---- observing syncs -----------------------------------------------------------------

@hookspec
def svcproxy_collect_metrics() -> Sequence[MetricSample] | None:
    """Called on every /metrics scrape: return gauges and counters to expose
    (MetricSample: name, help, value, labels, kind), read from the kernel at
    that moment — IPVS connection entries, conntrack usage. Keep it cheap."""


@hookspec
def svcproxy_report_object(kind: str, namespace: str, name: str, reason: str,
                           message: str) -> None:
    """A plugin found a problem with a cluster object (a bad annotation, say);
    it has already been logged. Sources that can tell the object's owner do
    (the Kubernetes source posts a Warning Event on the object). Each distinct
    report is made once per process."""


@hookspec
def svcproxy_observe_source_error(source: str, resource: str, message: str) -> None:
    """A source failed to read the cluster: a request to the API server that
    failed (`source` "kubernetes", `resource` "services", "endpointslices",
    ...: called on every failed attempt, each retry included) or a manifest
    file or directory that cannot be used (`source` "manifests", `resource`
    "files": called once per new problem). What was read before keeps being
    served. Metrics count these."""


@hookspec
def svcproxy_observe_sync(result: SyncResult) -> None:
    """Called after every sync attempt, successful or not, with its outcome,
    counts and phase durations (metrics, logs, traces)."""
