"""Builders for real-shaped API objects (as the API server returns them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def service(name: str = "web", namespace: str = "default", *,
            cluster_ip: str | list[str] = "10.96.0.10",
            ports: list[dict[str, Any]] | None = None, type: str = "ClusterIP",
            **spec: Any) -> dict[str, Any]:
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    status = spec.pop("status", {})
    labels = spec.pop("labels", None)
    annotations = spec.pop("annotations", None)
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "resourceVersion": "1"}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    body = {"type": type, "clusterIP": ips[0], "clusterIPs": ips,
            "ports": ports if ports is not None else [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body,
            "status": status}


def endpoint(ip: str, node: str = "", *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, zones: list[str] | None = None,
             nodes: list[str] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {}
    if ready is not None:
        cond["ready"] = ready
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [ip], "conditions": cond}
    if node:
        ep["nodeName"] = node
    hints: dict[str, Any] = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        ep["hints"] = hints
    return ep


def slice_(service_name: str = "web", namespace: str = "default", *,
           endpoints: list[dict[str, Any]], name: str | None = None,
           ports: list[dict[str, Any]] | None = None,
           address_type: str = "IPv4",
           annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name or f"{service_name}-abc", "namespace": namespace,
                            "labels": {"kubernetes.io/service-name": service_name},
                            "resourceVersion": "1"}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": address_type, "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}],
    }


def node(name: str = "node-a", *, ips: list[str] | None = None, zone: str | None = None,
         ) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}
                                     for ip in (ips or ["192.168.1.10"])]
                       + [{"type": "Hostname", "address": name}]}}


def build_state(objects: list[dict[str, Any]], node_name: str = "node-a"):  # type: ignore[no-untyped-def]
    """A ClusterState holding `objects` (API dicts), as a source would deliver them."""
    from svcproxy.bus import Event, EventType
    from svcproxy.model import parse_object
    from svcproxy.state import ClusterState

    state = ClusterState(node_name)
    for obj in objects:
        state.apply(Event(EventType.ADDED, parse_object(obj)))
    return state


def plan_of(objects: list[dict[str, Any]], config_text: str = "", node_name: str = "node-a",
            extra_plugins: list[tuple[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    """The full plan for `objects` with the built-in plugins (as `svcproxy plan` makes it)."""
    from svcproxy.config import parse_config
    from svcproxy.ir import ServiceMap
    from svcproxy.manager import PluginHost
    from svcproxy.plan import Planner, make_context

    config = parse_config(config_text, "test.yaml")
    host = PluginHost(config, extra_plugins=extra_plugins or [])
    host.configure()
    state = build_state(objects, node_name)
    ctx = make_context(config, node_name, state.node)
    plan, _ = Planner(host).plan_full(ctx, state, ServiceMap())
    return plan


class RecordingDatapath:
    """A datapath plugin for core tests: keeps what it was told to program, as a
    datapath's kernel would, and can be told to fail. (Kernel datapaths are
    tested against real kernels in tests/host and tests/vm.)"""

    def __init__(self, name: str = "recording") -> None:
        from svcproxy.ir import ServiceMap

        self.name = name
        self.programmed = ServiceMap()
        self.calls: list[tuple[bool, Any]] = []  # (full, delta)
        self.fail_with: Exception | None = None

    from svcproxy import hookimpl as _hookimpl

    @_hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [self.name]

    @_hookimpl
    def svcproxy_probe_datapath(self, name: str):  # type: ignore[no-untyped-def]
        from svcproxy.datapath import ProbeResult

        return ProbeResult.ok() if name == self.name else None

    @_hookimpl
    def svcproxy_apply_plan(self, name: str, plan: Any, delta: Any, full: bool):  # type: ignore[no-untyped-def]
        from svcproxy.datapath import ApplyResult

        if name != self.name:
            return None
        self.calls.append((full, delta))
        if self.fail_with is not None:
            raise self.fail_with
        self.programmed = plan
        return ApplyResult(changes=len(delta), phases={"write": 0.0})


def install_dist(root: Any, dist: str, entry_points: dict[str, str], module: str,
                 source: str) -> None:
    """Install a distribution the way pip lays it out: a module plus dist-info with
    METADATA and entry_points.txt, found by importlib.metadata on sys.path."""
    import textwrap

    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[svcproxy]\n{lines}\n")


class ProxyHarness:
    """svcproxy's core with one datapath, driven by API objects in-process (host
    and VM tests, benchmarks): publish objects, sync, look at the plugin."""

    def __init__(self, config_text: str, datapath: str, node_ips: list[str],
                 node_name: str = "node-a",
                 extra_plugins: list[tuple[str, Any]] | None = None,
                 start: bool = False) -> None:
        """`start`: start the plugins as `svcproxy run` does once it chose the
        datapath (so plugins that change settings follow the datapath's
        namespace and never the test machine's), without the health and
        metrics listeners."""
        from dataclasses import replace

        from svcproxy.config import parse_config
        from svcproxy.manager import PluginHost
        from svcproxy.proxy import Proxy

        self.config = parse_config(config_text, f"{datapath}-harness.yaml")
        if start:
            self.config = replace(self.config, kube_proxy=replace(
                self.config.kube_proxy, healthz_bind_address="", metrics_bind_address=""))
        self.host = PluginHost(self.config, extra_plugins=extra_plugins or [])
        self.host.configure()
        if start:
            self.host.start(datapath, [], node_name)
        self.datapath = datapath
        self.proxy = Proxy(self.config, self.host, node_name, datapath,
                           use_host_addresses=False)
        self.publish(node(node_name, ips=node_ips))

    @property
    def plugin(self) -> Any:
        return next(p.plugin for p in self.host.plugins if p.name == self.datapath)

    def publish(self, obj: dict[str, Any], type_: Any = None) -> None:
        from svcproxy.bus import Event, EventType
        from svcproxy.model import parse_object

        self.proxy.bus.publish(Event(type_ or EventType.ADDED, parse_object(obj)))

    def sync(self, full: bool = False) -> Any:
        result = self.proxy.sync(full=full)
        assert result.ok, result.error
        return result

    def plan(self) -> Any:
        """The full plan of the current state, as the next full sync makes it."""
        from svcproxy.ir import ServiceMap

        return self.proxy.planner.plan_full(self.proxy.context(), self.proxy.state,
                                            ServiceMap())[0]

    def preview(self) -> list[str]:
        """`svcproxy plan --against-kernel`: what a first sync would change."""
        changes = self.host.preview(self.datapath, self.plan())
        assert changes is not None
        return changes


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "the condition",
             interval: float = 0.05, retry_on: tuple[type[BaseException], ...] = ()) -> Any:
    """Call `cond` until it returns something truthy and return that; fail
    naming `what` after `timeout` seconds. Exceptions of `retry_on` raised by
    `cond` count as "not yet" (a server still starting), any other fails."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
            if value:
                return value
        except retry_on:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_cli(*argv: str) -> tuple[int, str]:
    """A `svcproxy` command run in this process, as `main` runs it (its parser,
    its command function, its exit code for usage errors) but without a Python
    start, which costs tens of seconds under the VM's emulation, and without
    touching logging (the caller's caplog sees the records). The signal
    handlers `run` installs are put back. Returns (exit code, stdout)."""
    import contextlib
    import io
    import signal

    from svcproxy.cli import build_parser
    from svcproxy.errors import SvcProxyError

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            args = build_parser().parse_args(list(argv))
            try:
                code = int(args.func(args))
            except SvcProxyError as exc:
                out.write(f"svcproxy: {exc}\n")
                code = exc.exit_code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, out.getvalue()


def config_text(kube_proxy: dict[str, Any] | None = None, **svcproxy: Any) -> str:
    """A config file: a KubeProxyConfiguration with these fields and, when
    svcproxy fields are given, a SvcProxyConfiguration with them."""
    import yaml

    docs: list[dict[str, Any]] = [{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                                   "kind": "KubeProxyConfiguration", **(kube_proxy or {})}]
    if svcproxy:
        docs.append({"apiVersion": "svcproxy.io/v1alpha1", "kind": "SvcProxyConfiguration",
                     **svcproxy})
    return yaml.safe_dump_all(docs, sort_keys=False)


def only_plugins(*names: str) -> str:
    """A SvcProxyConfiguration `disable:` line that keeps only these default
    plugins (and clusterip, which cannot be disabled): tests that isolate one."""
    from svcproxy.config import DEFAULT_PLUGINS, ESSENTIAL_DEFAULTS
    off = [n for n in DEFAULT_PLUGINS if n not in names and n not in ESSENTIAL_DEFAULTS]
    return f"disable: [{', '.join(off)}]"
