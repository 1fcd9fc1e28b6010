"""The plugin manager and the one typed facade through which the core calls hooks.

Plugins come from two places: svcproxy's built-ins (BUILTIN_PLUGINS) and
third-party packages that declare an entry point in the group ``svcproxy``. The
config enables them by name, in order; datapath plugins are enabled by being
named as the mode or in the datapath fallback order.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .config import ESSENTIAL_DEFAULTS, MODES, Config, nearest_name
from .datapath import (
    ApplyResult,
    CheckItem,
    MetricSample,
    ProbeResult,
    SyncResult,
    WatchedKind,
)
from .errors import ConfigError, ConfigProblem, PluginError
from .ir import Frontend, PlanDelta, ServiceMap

if TYPE_CHECKING:
    from .bus import Event
    from .plan import PortContext

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "svcproxy"

#: Built-in plugins by name -> module, or "module:Class" for plugins that keep
#: state (a fresh instance per PluginHost). Feature plugins first, then datapaths.
BUILTIN_PLUGINS: dict[str, str] = {
    "clusterip": "svcproxy.plugins.clusterip",
    "nodeport": "svcproxy.plugins.nodeport",
    "externalips": "svcproxy.plugins.externalips",
    "loadbalancer": "svcproxy.plugins.loadbalancer",
    "affinity": "svcproxy.plugins.affinity",
    "metrics": "svcproxy.plugins.metrics:MetricsPlugin",
    "tracing": "svcproxy.plugins.tracing:TracingPlugin",
    "conntrack": "svcproxy.plugins.conntrack:ConntrackPlugin",
    "metallb": "svcproxy.plugins.metallb:MetallbPlugin",
    "ipvs": "svcproxy.plugins.ipvs:IpvsPlugin",
    "iptables": "svcproxy.plugins.iptables:IptablesPlugin",
    "nftables": "svcproxy.plugins.nftables:NftablesPlugin",
}

#: Plugins that are always enabled: without them no Service is reachable at all.
ESSENTIAL_PLUGINS: tuple[str, ...] = ESSENTIAL_DEFAULTS


@dataclass
class LoadedPlugin:
    name: str
    plugin: Any
    #: "built-in" or "package <dist> <version>"
    origin: str
    essential: bool = False
    datapath: bool = False
    options: Mapping[str, Any] | None = None
    config_path: str = ""


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _instantiate(obj: Any) -> Any:
    return obj() if isinstance(obj, type) else obj


class PluginHost:
    """Loads, orders and calls plugins. Every hook call in the core goes through
    one of its methods, so timing, logging and error wrapping live here."""

    def register(self, name: str, plugin: Any) -> None:
        """Add a plugin after loading (the CLI's own observers)."""
        self.pm.register(plugin, name=name)
        self.plugins.append(LoadedPlugin(name, plugin, "svcproxy"))

    def __init__(self, config: Config, *, extra_plugins: Iterable[tuple[str, Any]] = ()) -> None:
        self.config = config
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._reported: set[tuple[str, str, str, str, str]] = set()
        self._build_chain: tuple[tuple[int, ...], list[tuple[Any, tuple[str, ...]]] | None] \
            | None = None
        self._adjust_chain: tuple[tuple[int, ...],
                                  list[tuple[Any, str, tuple[str, ...]]]] | None = None
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[LoadedPlugin] = []
        #: datapath name -> why it could not be loaded
        self.missing_datapaths: dict[str, str] = {}
        self._load(list(extra_plugins))

    # -- loading --------------------------------------------------------------------

    def _resolve(self, name: str, eps: Mapping[str, importlib.metadata.EntryPoint]
                 ) -> tuple[Any, str]:
        if name in BUILTIN_PLUGINS:
            module_name, _, attr = BUILTIN_PLUGINS[name].partition(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    raise PluginError(f"built-in plugin {name!r} is not part of this svcproxy "
                                      "version") from None
                raise
            return (_instantiate(getattr(module, attr)) if attr else module), "built-in"
        ep = eps.get(name)
        if ep is not None:
            dist = ep.dist
            origin = f"package {dist.name} {dist.version}" if dist else f"entry point {ep.value}"
            try:
                return _instantiate(ep.load()), origin
            except Exception as exc:
                raise PluginError(f"plugin {name!r} from {origin} failed to load: "
                                  f"{type(exc).__name__}: {exc}") from None
        known = sorted({*BUILTIN_PLUGINS, *eps})
        match = nearest_name(name, known)
        hint = f"; did you mean {match}?" if match else ""
        raise PluginError(f"unknown plugin {name!r}{hint} (built-in: "
                          f"{', '.join(n for n in BUILTIN_PLUGINS)}; installed: "
                          f"{', '.join(sorted(eps)) or 'none'})")

    def _load(self, extra: list[tuple[str, Any]]) -> None:
        eps = _entry_points()
        loaded, problems = self._configured_plugins(eps)
        loaded += [LoadedPlugin(name, _instantiate(obj), "registered by caller")
                   for name, obj in extra]
        enabled = {p.name for p in loaded}
        problems += self._unknown_datapaths(eps, enabled)
        if problems:
            raise ConfigError(self.config.source, problems)
        loaded += self._datapath_plugins(eps, enabled)
        self._register(loaded)
        self.plugins = loaded
        datapath_impls = self.pm.hook.svcproxy_list_datapaths.get_hookimpls()
        for lp in loaded:
            lp.datapath = lp.datapath or any(impl.plugin is lp.plugin for impl in datapath_impls)

    def _configured_plugins(self, eps: dict[str, Any]
                            ) -> tuple[list[LoadedPlugin], list[ConfigProblem]]:
        """The essential plugins, then the config's list, in order."""
        specs = list(self.config.svcproxy.plugins)
        names = [s.name for s in specs]
        problems: list[ConfigProblem] = []
        loaded: list[LoadedPlugin] = []
        for essential in reversed(ESSENTIAL_PLUGINS):
            if essential not in names:
                module, origin = self._resolve(essential, eps)
                loaded.insert(0, LoadedPlugin(essential, module, origin, essential=True))
        for spec in specs:
            try:
                obj, origin = self._resolve(spec.name, eps)
            except PluginError as exc:
                problems.append(ConfigProblem(f"{spec.path}.name" if spec.path else "plugins",
                                              str(exc)))
                continue
            loaded.append(LoadedPlugin(spec.name, obj, origin,
                                       essential=spec.name in ESSENTIAL_PLUGINS,
                                       options=spec.options, config_path=spec.path))
        return loaded, problems

    def _unknown_datapaths(self, eps: dict[str, Any], enabled: set[str]) -> list[ConfigProblem]:
        known = {*BUILTIN_PLUGINS, *eps, *(m for m in MODES if m)}
        problems = []
        for i, dp in enumerate(self.config.svcproxy.datapaths):
            if dp not in known and dp not in enabled:
                match = nearest_name(dp, sorted(known))
                hint = f"; did you mean {match}?" if match else ""
                problems.append(ConfigProblem(f"datapaths[{i}]",
                                              f"unknown datapath {dp!r}{hint}"))
        return problems

    def _datapath_plugins(self, eps: dict[str, Any], enabled: set[str]) -> list[LoadedPlugin]:
        """The datapaths of the fallback order not already enabled as plugins;
        one that cannot be loaded is remembered with the reason."""
        out = []
        for dp in self.config.datapath_order():
            if dp in enabled:
                continue
            try:
                obj, origin = self._resolve(dp, eps)
            except PluginError as exc:
                self.missing_datapaths[dp] = str(exc)
                continue
            out.append(LoadedPlugin(dp, obj, origin, datapath=True,
                                    options=self.config.svcproxy.datapath_options.get(dp),
                                    config_path=f"datapathOptions.{dp}"))
            enabled.add(dp)
        return out

    def _register(self, loaded: list[LoadedPlugin]) -> None:
        # pluggy calls the most recently registered implementation first, so
        # registering in reverse makes the config order the call order.
        for lp in reversed(loaded):
            try:
                self.pm.register(lp.plugin, name=lp.name)
            except ValueError as exc:
                raise PluginError(f"plugin {lp.name!r} cannot be registered: {exc}") from None
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}. "
                              f"Known hooks: {', '.join(self.hook_names())}") from None

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(hookspecs) if n.startswith("svcproxy_"))

    def implemented_hooks(self, plugin: LoadedPlugin) -> list[str]:
        hooks = []
        for name in self.hook_names():
            caller = getattr(self.pm.hook, name)
            if any(impl.plugin is plugin.plugin for impl in caller.get_hookimpls()):
                hooks.append(name)
        return hooks

    # -- configuration --------------------------------------------------------------

    def configure(self) -> None:
        """Call svcproxy_configure_plugin once per plugin with its own options."""
        others = [lp.plugin for lp in self.plugins]
        for lp in self.plugins:
            rest = [p for p in others if p is not lp.plugin]
            caller = self.pm.subset_hook_caller("svcproxy_configure_plugin", remove_plugins=rest)
            try:
                caller(config=self.config, options=dict(lp.options or {}))
            except (PluginError, ValueError, TypeError) as exc:
                path = lp.config_path if lp.datapath else (
                    f"{lp.config_path}.options" if lp.config_path else f"plugin {lp.name}")
                raise ConfigError(self.config.source, [ConfigProblem(path, str(exc))]) from None

    # -- planning -------------------------------------------------------------------

    def node_addresses(self, family: int) -> Sequence[str] | None:
        result = self.pm.hook.svcproxy_list_node_addresses(config=self.config, family=family)
        for answer in result:
            if answer is not None:
                return list(answer)
        return None

    def build_frontends(self, port: PortContext) -> list[Frontend]:
        # called for every port of every Service: the implementations are
        # resolved once and called directly, in pluggy's order (pluggy's own
        # dispatch was a sixth of planning 10,000 services); hook wrappers,
        # which only pluggy can run, send every call through pluggy
        hook = self.pm.hook.svcproxy_build_frontends
        impls = hook.get_hookimpls()
        key = tuple(map(id, impls))
        if self._build_chain is None or self._build_chain[0] != key:
            direct = not any(impl.hookwrapper or impl.wrapper for impl in impls)
            resolved: list[tuple[Any, tuple[str, ...]]] = [
                (impl.function, tuple(impl.argnames)) for impl in reversed(impls)]
            self._build_chain = (key, resolved if direct else None)
        out: list[Frontend] = []
        chain = self._build_chain[1]
        if chain is None:
            for answer in hook(port=port):
                if answer:
                    out.extend(answer)
            return out
        for function, argnames in chain:
            found = function(port) if argnames == ("port",) else function()
            if found:
                out.extend(found)
        return out

    def adjust_frontend(self, frontend: Frontend, port: PortContext) -> Frontend:
        # A chain, not a broadcast: each plugin sees the previous one's result, so
        # the implementations are called one by one in config order.
        impls = self.pm.hook.svcproxy_adjust_frontend.get_hookimpls()
        key = tuple(map(id, impls))
        if self._adjust_chain is None or self._adjust_chain[0] != key:
            # called for every frontend of every plan: resolve the chain once
            chain = [(impl.function, impl.plugin_name, tuple(impl.argnames))
                     for impl in reversed(impls) if not (impl.hookwrapper or impl.wrapper)]
            self._adjust_chain = (key, chain)
        for function, plugin_name, argnames in self._adjust_chain[1]:
            if argnames == ("frontend", "port"):
                result = function(frontend, port)
            else:
                kwargs = {"frontend": frontend, "port": port}
                result = function(*[kwargs[a] for a in argnames])
            if isinstance(result, Frontend):
                frontend = result
            elif result is not None:
                raise PluginError(f"plugin {plugin_name!r}: svcproxy_adjust_frontend must "
                                  f"return a Frontend or None, not {type(result).__name__}")
        return frontend

    # -- datapaths ------------------------------------------------------------------

    def datapath_names(self) -> list[str]:
        names: list[str] = []
        for answer in self.pm.hook.svcproxy_list_datapaths():
            names.extend(answer or ())
        return names

    def probe(self, name: str) -> ProbeResult:
        if name in self.missing_datapaths:
            return ProbeResult.unusable(self.missing_datapaths[name])
        try:
            result = self.pm.hook.svcproxy_probe_datapath(name=name, config=self.config)
        except Exception as exc:  # a probe that crashes means "unusable", with the reason
            return ProbeResult.unusable(f"probe failed: {type(exc).__name__}: {exc}")
        if result is None:
            return ProbeResult.unusable(f"no enabled plugin provides the {name} datapath")
        return result  # type: ignore[no-any-return]

    def select_datapath(self) -> tuple[str, list[tuple[str, str]]]:
        """The first usable datapath in the configured order, and the ones skipped
        with their reasons. Raises DatapathUnavailable when none is usable."""
        from .errors import DatapathUnavailable

        skipped: list[tuple[str, str]] = []
        for name in self.config.datapath_order():
            result = self.probe(name)
            if result.usable:
                return name, skipped
            skipped.append((name, result.reason))
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
        if not self.config.svcproxy.datapaths and self.config.kube_proxy.mode:
            reasons += " (the datapath fallback list is empty, so svcproxy does not fall back)"
        raise DatapathUnavailable(f"no usable datapath: {reasons}")

    def apply(self, name: str, plan: ServiceMap, delta: PlanDelta, full: bool) -> ApplyResult:
        result = self.pm.hook.svcproxy_apply_plan(name=name, plan=plan, delta=delta, full=full)
        if result is None:
            raise PluginError(f"no plugin applied the plan for datapath {name!r}")
        return result  # type: ignore[no-any-return]

    def apply_first(self, name: str, plan: ServiceMap) -> ApplyResult | None:
        """The datapath's additive cold-start write, or None if it has none."""
        return self.pm.hook.svcproxy_apply_first(  # type: ignore[no-any-return]
            name=name, plan=plan)

    def plan_formats(self) -> list[str]:
        formats: list[str] = []
        for answer in self.pm.hook.svcproxy_list_plan_formats():
            formats.extend(answer or ())
        return formats

    def preview(self, name: str, plan: ServiceMap) -> list[str] | None:
        answer = self.pm.hook.svcproxy_preview_plan(name=name, plan=plan)
        return None if answer is None else list(answer)

    def render(self, name: str, plan: ServiceMap, output: str) -> str | None:
        return self.pm.hook.svcproxy_render_plan(  # type: ignore[no-any-return]
            name=name, plan=plan, output=output)

    def prepare_node(self, datapath: str) -> list[str]:
        lines: list[str] = []
        for answer in self.pm.hook.svcproxy_prepare_node(config=self.config, datapath=datapath):
            lines.extend(answer or ())
        return lines

    def cleanup(self) -> list[str]:
        lines: list[str] = []
        for answer in self.pm.hook.svcproxy_cleanup_datapath(config=self.config):
            lines.extend(answer or ())
        return lines

    def datapath_status(self, name: str,
                        frontends: Mapping[tuple[str, int, str], Mapping[str, Any]],
                        connections: bool = False) -> Mapping[str, Any]:
        answer = self.pm.hook.svcproxy_datapath_status(name=name, frontends=frontends,
                                                       connections=connections)
        if answer is None:
            raise PluginError(f"datapath {name!r} cannot show its kernel state")
        return answer  # type: ignore[no-any-return]

    def render_status(self, name: str, view: Mapping[str, Any], stats: bool = False,
                      rate: bool = False, connections: bool = False) -> str | None:
        answer = self.pm.hook.svcproxy_render_status(name=name, view=view, stats=stats,
                                                     rate=rate, connections=connections)
        return answer if isinstance(answer, str) else None

    def watch_kinds(self) -> list[WatchedKind]:
        """Every extra resource kind the plugins asked for (first ask wins)."""
        out: dict[str, WatchedKind] = {}
        for answer in self.pm.hook.svcproxy_watch_kinds():
            for kind in answer or ():
                out.setdefault(kind.kind, kind)
        return list(out.values())

    def checks(self) -> list[CheckItem]:
        items: list[CheckItem] = []
        for answer in self.pm.hook.svcproxy_check(config=self.config):
            items.extend(answer or ())
        return items

    # -- lifecycle and observers ----------------------------------------------------

    def start(self, datapath: str, skipped: Sequence[tuple[str, str]] = (),
              node: str = "") -> None:
        self.pm.hook.svcproxy_start_proxy(config=self.config, datapath=datapath,
                                          skipped=list(skipped), node=node, host=self)

    def datapath_changed(self, datapath: str, previous: str, reason: str) -> None:
        self.pm.hook.svcproxy_datapath_changed(config=self.config, datapath=datapath,
                                               previous=previous, reason=reason)

    def stop(self) -> None:
        self.pm.hook.svcproxy_stop_proxy()

    def observe_event(self, event: Event) -> None:
        self._observe("svcproxy_observe_event", event=event)

    def observe_sync(self, result: SyncResult) -> None:
        self._observe("svcproxy_observe_sync", result=result)

    def observe_source_error(self, source: str, resource: str, message: str) -> None:
        self._observe("svcproxy_observe_source_error", source=source, resource=resource,
                      message=message)

    def collect_metrics(self) -> list[MetricSample]:
        """Every plugin's scrape-time samples; a failing plugin is logged and skipped."""
        out: list[MetricSample] = []
        for impl in self.pm.hook.svcproxy_collect_metrics.get_hookimpls():
            try:
                out.extend(impl.function() or ())  # type: ignore[arg-type]
            except Exception:
                log.exception("plugin %r failed in svcproxy_collect_metrics", impl.plugin_name)
        return out

    def report_object(self, kind: str, namespace: str, name: str, reason: str,
                      message: str) -> None:
        """Log a problem with a cluster object once, and hand it to the sources."""
        key = (kind, namespace, name, reason, message)
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning("%s %s/%s: %s", kind, namespace, name, message)
        self._observe("svcproxy_report_object", kind=kind, namespace=namespace, name=name,
                      reason=reason, message=message)

    def _observe(self, hook: str, **kwargs: Any) -> None:
        """Call every observer on its own: one that raises is logged (with its
        name) and the others still run — pluggy would stop the call at the
        first exception, so a metrics bug would silence tracing and the status
        file. Observer hooks take no wrappers; a wrapper would need pluggy's
        call, so with one the whole hook goes through pluggy as before."""
        caller = getattr(self.pm.hook, hook)
        impls = caller.get_hookimpls()
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            try:
                caller(**kwargs)
            except Exception:
                log.exception("a plugin failed in %s", hook)
            return
        for impl in reversed(impls):  # pluggy's order: the config's
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception:
                log.exception("plugin %r failed in %s; the other observers still ran",
                              impl.plugin_name, hook)

