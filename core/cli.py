"""The `svcproxy` command.

Every user-facing failure is an SvcProxyError: it is printed as one readable
message (no traceback) and the process exits with its exit code (2 for usage
and config errors).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import yaml

from . import __version__, runner
from .config import Config, effective_values, load_config, setting_owners, unused_settings
from .errors import SvcProxyError, UsageError
from .gcpause import gc_paused
from .ir import ServiceMap
from .manager import PluginHost
from .plan import Planner, make_context
from .proxy import Proxy
from .sources.kubeclient import load_client
from .sources.kubernetes import KubernetesSource
from .sources.manifests import ManifestSource
from .state import ClusterState
from .status import DEFAULT_SOCKET, StatusFile, StatusSocket

log = logging.getLogger("svcproxy")


# ---- logging ---------------------------------------------------------------------

class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


# ---- shared helpers ---------------------------------------------------------------

def _resolve_node_name(arg: str | None, config: Config, state: ClusterState | None) -> str:
    """--node, then hostnameOverride, then $NODE_NAME, then the only Node in the
    manifests, then the hostname."""
    if arg:
        return arg
    if config.kube_proxy.hostname_override:
        return config.kube_proxy.hostname_override.strip().lower()
    if os.environ.get("NODE_NAME"):
        return os.environ["NODE_NAME"].strip().lower()
    if state is not None and len(state.nodes) == 1:
        return next(iter(state.nodes))
    return socket.gethostname().lower()


def _load_manifests(directory: str, node_arg: str | None, config: Config,
                    strict: bool) -> tuple[ClusterState, ManifestSource]:
    """Read a manifest directory into a fresh state. With `strict`, any bad file is
    an error (exit 2); otherwise bad files are logged and skipped."""
    holder = ClusterState("")
    source = ManifestSource(directory, publish=holder.apply)
    source.check_directory()
    source.scan()
    if strict and source.errors:
        raise UsageError("\n".join(str(e) for e in source.errors))
    node_name = _resolve_node_name(node_arg, config, holder)
    holder.node_name = node_name
    return holder, source


def _plugins(config_path: str | None) -> tuple[Config, PluginHost]:
    config = load_config(config_path)
    host = PluginHost(config)
    host.configure()
    return config, host


# ---- plan -------------------------------------------------------------------------

def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def json_lines(items: list[Any]) -> str:
    """A JSON list with one item per line, each encoded by json's C encoder
    (indent= makes json use its pure-Python encoder: seconds for a large plan)."""
    if not items:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]\n"


def render_table(plan: ServiceMap) -> str:
    """Like `ipvsadm -L -n`, with the kind and service port of each frontend."""
    lines = ["Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port           Weight State        Kind / Service"]
    for fe in plan:
        flags = " ".join(fe.scheduler_flags)
        head = f"{fe.protocol:<4} {_host_port(fe.address, fe.port)} {fe.scheduler}"
        if flags:
            head += f" {flags}"
        if fe.persistence_timeout:
            head += f" persistent {fe.persistence_timeout}"
        extra = f"{fe.kind} {fe.service}"
        if fe.traffic_policy == "Local":
            extra += " (Local)"
        if fe.source_ranges:
            extra += f" sourceRanges={','.join(fe.source_ranges)}"
        lines.append(f"{head:<44} {extra}")
        for b in fe.backends:
            lines.append(f"  -> {_host_port(b.address, b.port):<28} {b.weight:<6} {_state(b)}")
        if not fe.backends and fe.cluster_backends:
            lines.append(f"  (no local endpoints; {len(fe.cluster_backends)} cluster endpoints "
                         "available for fallback)")
    return "\n".join(lines) + "\n"


def _state(b: Any) -> str:
    parts = ["ready" if b.ready else ("terminating" if b.terminating else "not-ready")]
    if b.local:
        parts.append("local")
    return ",".join(parts)


def _kubernetes_source(args: argparse.Namespace, config: Config, host: PluginHost,
                       proxy: Proxy, one_shot: bool) -> KubernetesSource:
    """The API server source of `run` and `plan`, feeding `proxy`; not started.
    --kubeconfig wins over clientConnection.kubeconfig, as with kube-proxy.
    A one-shot command (`plan`, `run --once`) also waits for the Node's list:
    its one sync is all it writes (NodePort addresses, local endpoints)."""
    api = load_client(args.kubeconfig or config.kube_proxy.client_connection.kubeconfig)
    proxy.set_node_name(_resolve_node_name(args.node, config, None))
    for name in KubernetesSource.REQUIRED + (("nodes",) if one_shot else ()):
        proxy.bus.expect(name)
    return KubernetesSource(api, proxy.node_name, proxy.bus.publish, proxy.bus.mark_synced,
                            resync_period=config.kube_proxy.config_sync_period,
                            extra_kinds=host.watch_kinds(),
                            on_error=functools.partial(host.observe_source_error, "kubernetes"),
                            backoff_cap=getattr(args, "api_backoff_cap", 30.0))


def _read_cluster(args: argparse.Namespace, config: Config, host: PluginHost,
                  proxy: Proxy) -> None:
    """Fill `proxy.state` as `run` would before its first sync: from the manifest
    directory, or from the API server's lists (--kubeconfig, clientConnection's,
    in-cluster, $KUBECONFIG), then stop watching."""
    if args.manifests:
        source = ManifestSource(args.manifests, publish=proxy.bus.publish,
                                extra_kinds=host.watch_kinds())
        source.check_directory()
        source.scan()
        if source.errors:
            raise UsageError("\n".join(str(e) for e in source.errors))
        proxy.set_node_name(_resolve_node_name(args.node, config, proxy.state))
        where = args.manifests
    else:
        try:
            k8s = _kubernetes_source(args, config, host, proxy, one_shot=True)
        except UsageError as exc:
            raise UsageError(f"{exc} (or plan a manifest directory: --manifests DIR)") from None
        k8s.start()
        try:
            if not proxy.bus.wait_ready(args.sync_timeout):
                raise SvcProxyError(f"the initial lists did not complete within "
                                    f"{args.sync_timeout:.0f}s (see the log for why)")
        finally:
            k8s.stop()
        where = "the cluster"
    if proxy.state.node is None:
        log.warning("Node %r is not in %s: NodePort frontends get no address and no endpoint "
                    "counts as local (choose the node with --node)", proxy.node_name, where)


def cmd_plan(args: argparse.Namespace) -> int:
    # a one-shot command over a large heap: no cyclic collection (svcproxy.gcpause)
    with gc_paused():
        return _plan(args)


def _plan(args: argparse.Namespace) -> int:
    config, host = _plugins(args.config)
    datapath = args.datapath or config.datapath_order()[0]
    if args.against_kernel and not args.datapath:
        datapath, _ = _select_datapath(host)  # the one `run` would use on this node
    proxy = Proxy(config, host, "", datapath, use_host_addresses=args.against_kernel)
    _read_cluster(args, config, host, proxy)
    state = proxy.state
    ctx = proxy.context() if args.against_kernel else \
        make_context(config, state.node_name, state.node)
    plan, _ = Planner(host).plan_full(ctx, state, ServiceMap())
    if args.against_kernel:
        return _print_preview(host, datapath, plan, args.output)
    output = args.output
    if output == "json":
        sys.stdout.write(json_lines(plan.to_json()))
    elif output == "table":
        sys.stdout.write(render_table(plan))
    else:
        datapath = args.datapath or config.datapath_order()[0]
        text = host.render(datapath, plan, output)
        if text is None:
            formats = ", ".join(["table", "json", *host.plan_formats()])
            raise UsageError(f"--output {output!r}: unknown format (available: {formats})")
        sys.stdout.write(text)
    return 0


def _print_preview(host: PluginHost, datapath: str, plan: ServiceMap, output: str) -> int:
    changes = host.preview(datapath, plan)
    if changes is None:
        raise UsageError(f"--against-kernel: the {datapath} datapath cannot preview a sync")
    if output == "json":
        sys.stdout.write(json.dumps({"datapath": datapath, "frontends": len(plan.frontends),
                                     "changes": changes}, indent=2) + "\n")
        return 0
    if output != "table":
        raise UsageError(f"--output {output!r}: with --against-kernel, table or json")
    sys.stdout.write(f"# the first {datapath} sync on this node would make "
                     f"{len(changes)} change(s) for {len(plan.frontends)} frontends"
                     f"{' (the kernel already holds this plan)' if not changes else ':'}\n")
    sys.stdout.writelines(f"{line}\n" for line in changes)
    return 0


# ---- run ----------------------------------------------------------------------------

def _select_datapath(host: PluginHost) -> tuple[str, list[tuple[str, str]]]:
    name, skipped = host.select_datapath()
    for dp, reason in skipped:
        log.warning("%s datapath unusable: %s; using %s", dp, reason, name)
    log.info("using the %s datapath", name)
    return name, skipped


class DatapathWatch:
    """While `svcproxy run` runs, probe the datapaths now and then: one earlier
    in the order that has become usable (the IPVS modules were installed) takes
    over, and so does the next usable one when the active datapath fails its
    probe twice in a row (its modules are gone). The switch itself is the
    proxy's (Proxy.switch_datapath): the new datapath syncs in full, then
    retires what the old one left, connections intact."""

    def __init__(self, host: PluginHost, proxy: Proxy, interval: float) -> None:
        self.host = host
        self.proxy = proxy
        self.interval = interval
        self.active_failures = 0

    def check(self) -> str | None:
        """Probe once; returns the datapath switched to, if any."""
        order = list(self.host.config.datapath_order())
        active = self.proxy.datapath
        index = order.index(active) if active in order else len(order)
        for name in order[:index]:
            if self.host.probe(name).usable:
                self.proxy.switch_datapath(name, f"the {name} datapath is usable now "
                                                 f"(before {active} in the order)")
                return name
        result = self.host.probe(active)
        if result.usable:
            self.active_failures = 0
            return None
        self.active_failures += 1
        if self.active_failures < 2:
            return None
        for name in order[index + 1:]:
            if self.host.probe(name).usable:
                self.active_failures = 0
                self.proxy.switch_datapath(name, f"the {active} datapath stopped working: "
                                                 f"{result.reason}")
                return name
        return None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a probe that crashes must not end the watch
                log.exception("probing the datapaths failed")


def _apply_process_settings(args: argparse.Namespace, config: Config) -> None:
    """What kube-proxy's config says about the process itself: logging (the
    command-line flags win, as kube-proxy's do) and oomScoreAdj; then, once,
    every accepted setting svcproxy does not use."""
    kp = config.kube_proxy
    level = args.log_level or ("debug" if kp.logging.verbosity >= 4 else "info")
    setup_logging(level, args.log_format or kp.logging.format)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(kp.oom_score_adj))
    except OSError as exc:
        # lowering it needs CAP_SYS_RESOURCE (the DaemonSet has it)
        report = log.info if exc.errno in (errno.EACCES, errno.EPERM) else log.warning
        report("cannot set oomScoreAdj %d: %s", kp.oom_score_adj, exc)
    for line in unused_settings(kp):
        log.warning("%s", line)


def _status_observers(args: argparse.Namespace, host: PluginHost, node: str) -> None:
    if args.status_file:
        host.register("status-file", StatusFile(args.status_file, node))
    if args.status_socket and not args.once:
        host.register("status-socket", StatusSocket(args.status_socket, node))


def cmd_run(args: argparse.Namespace) -> int:
    config, host = _plugins(args.config)
    _apply_process_settings(args, config)
    datapath, skipped = _select_datapath(host)
    proxy = Proxy(config, host, "", datapath)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    background: list[threading.Thread] = []
    k8s: KubernetesSource | None = None
    if args.manifests:
        source = ManifestSource(args.manifests, publish=proxy.bus.publish,
                                poll_interval=args.poll_interval,
                                extra_kinds=host.watch_kinds(),
                                on_error=functools.partial(host.observe_source_error,
                                                           "manifests"))
        source.check_directory()
        source.scan()
        proxy.set_node_name(_resolve_node_name(args.node, config, proxy.state))
        if not args.once:
            background.append(threading.Thread(target=source.watch, args=(stop,),
                                               name="manifests", daemon=True))
    else:
        k8s = _kubernetes_source(args, config, host, proxy, one_shot=args.once)
        host.register("kubernetes-events", k8s)
    _status_observers(args, host, proxy.node_name)
    host.start(datapath, skipped, proxy.node_name)
    try:
        if k8s is not None:
            k8s.start()
            log.info("waiting for the initial lists of Services and EndpointSlices")
            if not args.once:
                runner.preload()
            deadline = time.monotonic() + args.sync_timeout
            while not proxy.bus.wait_ready(0.2):
                if stop.is_set():
                    return 0
                if time.monotonic() > deadline:
                    raise SvcProxyError(f"the initial lists did not complete within "
                                        f"{args.sync_timeout:.0f}s (see the log for why)")
        if args.once:
            result = proxy.sync(full=True)
            if not result.ok:
                raise SvcProxyError(f"sync failed: {result.error}")
            return 0
        proxy.start_runner()
        if args.datapath_reprobe > 0:
            watch = DatapathWatch(host, proxy, args.datapath_reprobe)
            background.append(threading.Thread(target=watch.run, args=(stop,),
                                               name="datapath-watch", daemon=True))
        for t in background:
            t.start()
        stop.wait()
        proxy.stop_runner()
        for t in background:
            t.join(timeout=5)
        return 0
    finally:
        if k8s is not None:
            k8s.stop()
        host.stop()


# ---- plugins, config, cleanup --------------------------------------------------------

def cmd_plugins(args: argparse.Namespace) -> int:
    _, host = _plugins(args.config)
    rows = []
    for lp in host.plugins:
        role = "datapath" if lp.datapath else ("essential" if lp.essential else "feature")
        hooks = [h.removeprefix("svcproxy_") for h in host.implemented_hooks(lp)]
        rows.append({"name": lp.name, "role": role, "origin": lp.origin, "hooks": hooks})
    for dp, reason in host.missing_datapaths.items():
        rows.append({"name": dp, "role": "datapath", "origin": f"unavailable: {reason}",
                     "hooks": []})
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    for i, r in enumerate(rows, 1):
        sys.stdout.write(f"{i:>2}. {r['name']:<{width}}{r['role']:<10} {r['origin']}\n")
        if r["hooks"]:
            sys.stdout.write(f"    {'':<{width}}hooks: {', '.join(r['hooks'])}\n")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    PluginHost(config).configure()  # plugin names and options are part of the config
    values = effective_values(config)
    values["notUsedBySvcproxy"] = unused_settings(config.kube_proxy)
    values["appliedBy"] = setting_owners(config)
    if args.output == "json":
        sys.stdout.write(json.dumps(values, indent=2) + "\n")
    else:
        sys.stdout.write(f"{args.file}: OK\n")
        sys.stdout.write(yaml.safe_dump(values, sort_keys=False))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """What a privileged init container does before `run` starts without
    privileges: the sysctls and modules the selected datapath needs."""
    _, host = _plugins(args.config)
    datapath, skipped = host.select_datapath()
    for name, reason in skipped:
        sys.stdout.write(f"{name} datapath unusable: {reason}\n")
    lines = host.prepare_node(datapath)
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"node prepared for the {datapath} datapath"
                     f"{'' if lines else ': nothing to change'}\n")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    _, host = _plugins(args.config)
    lines = host.cleanup()
    for line in lines:
        sys.stdout.write(line + "\n")
    if not lines:
        sys.stdout.write("nothing to clean up\n")
    return 0


# ---- status and check ------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    from .inspect import frontends_from_daemon, index_frontends, run_status

    config, host = _plugins(args.config)
    datapath = args.datapath or host.select_datapath()[0]
    note = ""
    if args.manifests:
        state, _ = _load_manifests(args.manifests, args.node, config, strict=False)
        plan, _ = Planner(host).plan_full(make_context(config, state.node_name, state.node),
                                          state, ServiceMap())
        frontends = index_frontends(plan.to_json())
    else:
        found, where = frontends_from_daemon(args.status_socket)
        frontends = found or {}
        if found is None:
            note = (f"service names unknown: no running svcproxy answered ({where}); "
                    "give --manifests DIR to plan them here")
    if args.watch is not None and args.watch <= 0:
        raise UsageError(f"--watch: the interval must be > 0 seconds (got {args.watch:g})")
    return run_status(host, datapath, frontends, args.output, args.stats, args.rate,
                      args.connection, args.watch, note)


def cmd_check(args: argparse.Namespace) -> int:
    from .inspect import run_check

    config, host = _plugins(args.config)
    return run_check(host, config, args.output)


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    # the demo is not part of the core: it drives the datapath plugins' kernel
    demo = importlib.import_module("svcproxy.demo")
    if args.requests < 1:
        raise UsageError(f"--requests must be at least 1 (got {args.requests})")
    return int(demo.run_demo(args.manifests, args.config, args.requests))


# ---- parser --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 already; keep its message
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="svcproxy", description="A pluggable Kubernetes service proxy.")
    p.add_argument("--version", action="version", version=f"svcproxy {__version__}")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error"],
                   help="default: info, or debug with the config's logging.verbosity >= 4")
    p.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="default: the config's logging.format (text)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser("plan", help="print what would be programmed (dry run)")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--manifests", metavar="DIR",
                     help="read Services, EndpointSlices and Nodes from a directory")
    src.add_argument("--kubeconfig", metavar="PATH",
                     help="list them from the API server, as `run` does (default without "
                     "--manifests: clientConnection.kubeconfig, in-cluster config, then "
                     "$KUBECONFIG)")
    sp.add_argument("--config", metavar="FILE")
    sp.add_argument("--node", "--hostname-override", dest="node", metavar="NAME",
                    help="the node to plan for")
    sp.add_argument("--output", "-o", default="table",
                    help="table, json, or a datapath format (ipvsadm, iptables-save)")
    sp.add_argument("--datapath", help="datapath that renders a datapath format "
                    "(default: the configured one; with --against-kernel: the one `run` "
                    "would select here)")
    sp.add_argument("--against-kernel", action="store_true",
                    help="print what the first sync would change in this node's kernel "
                    "(read it as `run` does, change nothing)")
    sp.add_argument("--sync-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("run", help="run the proxy")
    sp.add_argument("--config", metavar="FILE")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--manifests", metavar="DIR",
                     help="read Services, EndpointSlices and Nodes from a directory")
    src.add_argument("--kubeconfig", metavar="PATH",
                     help="watch the API server (default without --manifests: in-cluster "
                     "config, then $KUBECONFIG)")
    sp.add_argument("--node", "--hostname-override", dest="node", metavar="NAME",
                    help="the node to proxy for (default: hostnameOverride, $NODE_NAME, "
                    "the hostname)")
    sp.add_argument("--sync-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    sp.add_argument("--once", action="store_true", help="one full sync, then exit")
    sp.add_argument("--status-file", metavar="PATH",
                    help="keep a JSON status file here (active datapath, fallback reasons, "
                    "last sync)")
    sp.add_argument("--status-socket", metavar="PATH", default=DEFAULT_SOCKET,
                    help="answer `svcproxy status` on this unix socket (root only; default "
                    f"{DEFAULT_SOCKET}; '' = none)")
    sp.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    sp.add_argument("--api-backoff-cap", type=float, default=30.0, help=argparse.SUPPRESS)
    sp.add_argument("--datapath-reprobe", type=float, default=60.0, metavar="SECONDS",
                    help="probe the datapaths this often while running: one earlier in the "
                    "order that became usable, or the next one when the active one stops "
                    "working, takes over without breaking connections (0 = never)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("status", help="the live kernel view, with service names "
                        "(like ipvsadm -L -n)")
    sp.add_argument("--config", metavar="FILE")
    sp.add_argument("--manifests", metavar="DIR",
                    help="plan service names from this directory (default: ask the running "
                    "svcproxy on its status socket)")
    sp.add_argument("--status-socket", metavar="PATH", default=DEFAULT_SOCKET,
                    help=f"the running svcproxy's status socket (default {DEFAULT_SOCKET})")
    sp.add_argument("--node", metavar="NAME", help="the node to plan for (with --manifests)")
    sp.add_argument("--datapath", help="datapath to show (default: the one svcproxy would use)")
    sp.add_argument("--stats", action="store_true", help="counters (ipvsadm --stats)")
    sp.add_argument("--rate", action="store_true", help="rates (ipvsadm --rate)")
    sp.add_argument("--connection", "-c", action="store_true",
                    help="the connection table under each frontend (ipvsadm --connection)")
    sp.add_argument("--output", "-o", default="table", choices=["table", "json"])
    sp.add_argument("--watch", "-w", type=float, nargs="?", const=1.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 1) until interrupted")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("check", help="prerequisites and health, with the commands that fix "
                        "problems; exit 1 when the configured mode cannot run")
    sp.add_argument("--config", metavar="FILE")
    sp.add_argument("--output", "-o", default="table", choices=["table", "json"])
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("demo", help="a throwaway node in network namespaces: svcproxy "
                        "with this kernel's best datapath, real requests, a rolling update "
                        "(root)")
    sp.add_argument("--manifests", metavar="DIR", help="the cluster (default: examples/cluster)")
    sp.add_argument("--config", metavar="FILE",
                    help="KubeProxyConfiguration (default: examples/config.yaml)")
    sp.add_argument("--requests", type=int, default=30, metavar="N",
                    help="requests per frontend (default 30)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("plugins", help="list enabled plugins in call order")
    sp.add_argument("--config", metavar="FILE")
    sp.add_argument("--output", "-o", default="table", choices=["table", "json"])
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    cp = csub.add_parser("check", help="validate a config file and print effective values")
    cp.add_argument("file", metavar="FILE")
    cp.add_argument("--output", "-o", default="yaml", choices=["yaml", "json"])
    cp.set_defaults(func=cmd_config_check)

    sp = sub.add_parser("prepare", help="set the sysctls and load the modules the datapath "
                        "needs (the DaemonSet's privileged init container), then exit")
    sp.add_argument("--config", metavar="FILE")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("cleanup", help="remove everything svcproxy programmed")
    sp.add_argument("--config", metavar="FILE")
    sp.set_defaults(func=cmd_cleanup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level or "info", args.log_format or "text")
    try:
        return int(args.func(args))
    except SvcProxyError as exc:
        sys.stderr.write(f"svcproxy: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

