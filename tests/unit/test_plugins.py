"""Plugin loading, ordering, configuration, hook chaining and datapath selection."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from factories import endpoint, install_dist, only_plugins, plan_of, service, slice_

from svcproxy import hookimpl, hookspecs
from svcproxy.config import parse_config
from svcproxy.datapath import ApplyResult, ProbeResult
from svcproxy.errors import ConfigError, DatapathUnavailable, PluginError
from svcproxy.ir import Frontend, PlanDelta, ServiceMap
from svcproxy.manager import PluginHost

KP = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
SP = "---\napiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"


def host_for(svcproxy_doc: str = "", kube_proxy: str = "", **kw: Any) -> PluginHost:
    text = KP + kube_proxy + (SP + textwrap.dedent(svcproxy_doc) if svcproxy_doc else "")
    host = PluginHost(parse_config(text, "cfg.yaml"), **kw)
    host.configure()
    return host


class Tagger:
    """A plugin that appends its name to every frontend's scheduler flags."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.options: dict[str, Any] = {}

    @hookimpl
    def svcproxy_configure_plugin(self, options: dict[str, Any]) -> None:
        self.options = options

    @hookimpl
    def svcproxy_adjust_frontend(self, frontend: Frontend) -> Frontend:
        return replace(frontend, scheduler_flags=(*frontend.scheduler_flags, self.tag))


TAGGER_MODULE = """
    from dataclasses import replace
    from svcproxy import hookimpl

    class Tag:
        tag = "?"
        @hookimpl
        def svcproxy_adjust_frontend(self, frontend):
            return replace(frontend, scheduler_flags=(*frontend.scheduler_flags, self.tag))

    class TagA(Tag):
        tag = "a"

    class TagB(Tag):
        tag = "b"
"""


@pytest.fixture
def tag_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_dist(tmp_path, "svcproxy-tags", {"tag-a": "svcproxy_tags:TagA",
                                             "tag-b": "svcproxy_tags:TagB"},
                 "svcproxy_tags", TAGGER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("tag_dist")
@pytest.mark.parametrize("order", [["tag-a", "tag-b"], ["tag-b", "tag-a"]])
def test_entry_point_plugins_run_in_config_order(order: list[str]) -> None:
    doc = only_plugins() + "\nenable: [" + ", ".join(order) + "]\n"
    host = host_for(doc)
    assert [p.name for p in host.plugins if not p.datapath] == ["clusterip", *order]
    assert host.plugins[1].origin == "package svcproxy-tags 1.2.3"
    plan = plan_of([service(), slice_(endpoints=[endpoint("10.0.0.1")])],
                   KP + SP + doc)
    assert next(iter(plan)).scheduler_flags == tuple(o[-1] for o in order)


def test_essential_plugin_cannot_be_left_out() -> None:
    host = host_for(only_plugins("affinity") + "\n")
    assert [(p.name, p.essential) for p in host.plugins if not p.datapath] == [
        ("clusterip", True), ("affinity", False)]
    with pytest.raises(ConfigError, match=r"disable\[0\]: plugin 'clusterip' cannot be "
                       "disabled: without it no Service is reachable"):
        host_for("disable: [clusterip]\n")


def test_disabled_builtin_plugin_contributes_nothing() -> None:
    svc = service(type="NodePort", ports=[{"port": 80, "nodePort": 30080}],
                  sessionAffinity="ClientIP")
    from factories import node
    objs = [node(), svc]
    assert len(plan_of(objs)) == 2
    plan = plan_of(objs, KP + SP + only_plugins() + "\n")
    assert [f.kind for f in plan] == ["ClusterIP"]
    assert next(iter(plan)).persistence_timeout == 0


def test_unknown_plugin_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as exc:
        host_for("enable: [nodeprot]\n")
    msg = str(exc.value)
    assert msg.startswith("cfg.yaml") and "enable[0].name" in msg
    assert "unknown plugin 'nodeprot'; did you mean nodeport?" in msg


def test_unknown_datapath_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"datapaths\[1\]: unknown datapath 'iptabels'; "
                                          r"did you mean iptables\?"):
        host_for("datapaths: [ipvs, iptabels]\n")


def test_misspelt_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def svcproxy_adjust_frontends(self, frontend: Frontend) -> None:
            return None

    with pytest.raises(PluginError, match="svcproxy_adjust_frontends"):
        host_for(extra_plugins=[("typo", Typo())])


def test_plugin_options_reach_only_their_plugin_and_errors_name_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_dist(tmp_path, "svcproxy-strict", {"strict": "svcproxy_strict:Strict"},
                 "svcproxy_strict", """
        from svcproxy import hookimpl
        from svcproxy.errors import PluginError

        class Strict:
            seen = []
            @hookimpl
            def svcproxy_configure_plugin(self, options):
                Strict.seen.append(dict(options))
                if "level" in options and options["level"] not in ("low", "high"):
                    raise PluginError(f"level: must be low or high (got {options['level']!r})")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    host_for("enable: [{name: strict, options: {level: low}}]\n")
    import svcproxy_strict  # type: ignore[import-not-found]
    assert svcproxy_strict.Strict.seen == [{"level": "low"}]
    with pytest.raises(ConfigError) as exc:
        host_for("enable: [{name: strict, options: {level: mid}}]\n")
    assert "enable[0].options: level: must be low or high (got 'mid')" in str(exc.value)


def port_context():  # type: ignore[no-untyped-def]
    from svcproxy.endpoints import Categorized
    from svcproxy.model import parse_object
    from svcproxy.plan import PortContext, make_context

    svc = parse_object(service("s", "ns", cluster_ip="10.0.0.1", ports=[
        {"name": "p", "port": 80, "protocol": "TCP"}]))
    ctx = make_context(host_for("").config, "node-a", None)
    return PortContext(ctx, svc, svc.ports[0], 4, Categorized())  # type: ignore[arg-type]


def test_adjust_chain_sees_previous_result() -> None:
    a, b = Tagger("a"), Tagger("b")
    host = host_for(only_plugins() + "\n", extra_plugins=[("a", a), ("b", b)])
    fe = Frontend("10.0.0.1", 80, "TCP", "ClusterIP", "ns/s:p")  # type: ignore[arg-type]
    out = host.adjust_frontend(fe, port_context())
    assert out.scheduler_flags == ("a", "b")


def test_adjust_must_return_a_frontend() -> None:
    class Bad:
        @hookimpl
        def svcproxy_adjust_frontend(self, frontend: Frontend) -> Any:
            return {"scheduler": "rr"}

    host = host_for(only_plugins() + "\n", extra_plugins=[("bad", Bad())])
    fe = Frontend("10.0.0.1", 80, "TCP", "ClusterIP", "ns/s:p")  # type: ignore[arg-type]
    with pytest.raises(PluginError, match="must return a Frontend or None, not dict"):
        host.adjust_frontend(fe, port_context())


class FakeKernelDatapath:
    """A datapath plugin for tests: records what it was asked to apply."""

    def __init__(self, name: str, usable: bool = True, reason: str = "") -> None:
        self.name = name
        self.usable = usable
        self.reason = reason
        self.applied: list[tuple[int, PlanDelta, bool]] = []

    @hookimpl
    def svcproxy_list_datapaths(self) -> list[str]:
        return [self.name]

    @hookimpl
    def svcproxy_probe_datapath(self, name: str) -> ProbeResult | None:
        if name != self.name:
            return None
        return ProbeResult(self.usable, self.reason)

    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: ServiceMap, delta: PlanDelta,
                            full: bool) -> ApplyResult | None:
        if name != self.name:
            return None
        self.applied.append((len(plan), delta, full))
        return ApplyResult(changes=len(delta))


def test_fallback_to_next_datapath_with_reason() -> None:
    first = FakeKernelDatapath("fast", usable=False, reason="fast module missing")
    second = FakeKernelDatapath("slow")
    host = host_for("datapaths: [fast, slow]\n", extra_plugins=[("fast", first),
                                                                  ("slow", second)])
    name, skipped = host.select_datapath()
    assert name == "slow" and skipped == [("fast", "fast module missing")]
    host.apply("slow", ServiceMap(), PlanDelta(), True)
    assert first.applied == [] and len(second.applied) == 1


def test_no_fallback_when_list_is_empty() -> None:
    fast = FakeKernelDatapath("fast", usable=False, reason="fast module missing")
    slow = FakeKernelDatapath("slow")
    host = host_for("datapaths: []\n", kube_proxy="mode: ipvs\n",
                    extra_plugins=[("fast", fast), ("slow", slow)])
    with pytest.raises(DatapathUnavailable) as exc:
        host.select_datapath()
    assert "svcproxy does not fall back" in str(exc.value)


def test_probe_crash_is_a_reason_not_a_crash() -> None:
    class Crashy:
        @hookimpl
        def svcproxy_probe_datapath(self, name: str) -> ProbeResult:
            raise OSError("netlink socket refused")

    host = host_for(extra_plugins=[("crashy", Crashy())])
    assert host.probe("x").reason == "probe failed: OSError: netlink socket refused"


def test_every_hookspec_is_documented() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "plugins.md").read_text()
    for name in dir(hookspecs):
        if not name.startswith("svcproxy_"):
            continue
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no docstring"
        assert f"`{name}" in docs, f"{name} is missing from docs/plugins.md"


def test_build_frontends_direct_dispatch_matches_pluggy() -> None:
    """build_frontends calls the implementations directly (resolved once), in
    pluggy's order; a hook wrapper, which only pluggy can run, sends every call
    through pluggy — the same frontends either way."""
    order: list[str] = []

    class Extra:
        def __init__(self, name: str, address: str) -> None:
            self.name, self.address = name, address

        @hookimpl
        def svcproxy_build_frontends(self, port: Any) -> list[Frontend]:
            order.append(self.name)
            return [port.frontend(self.address, 80, "ExternalIP", "Cluster")]

    class First:
        @hookimpl(tryfirst=True)
        def svcproxy_build_frontends(self) -> None:  # no arguments: allowed by pluggy
            order.append("first")

    class Wrapper:
        calls = 0

        @hookimpl(wrapper=True)
        def svcproxy_build_frontends(self, port: Any) -> Any:
            Wrapper.calls += 1
            return (yield)

    extras = [("x", Extra("x", "192.0.2.1")), ("y", Extra("y", "192.0.2.2")),
              ("first", First())]
    host = host_for(only_plugins() + "\n", extra_plugins=extras)
    pc = port_context()
    direct = host.build_frontends(pc)
    expected = list(order)
    via_pluggy = [fe for answer in host.pm.hook.svcproxy_build_frontends(port=pc) if answer
                  for fe in answer]
    assert direct == via_pluggy
    assert expected[0] == "first" and order[len(expected):] == expected
    assert {fe.address for fe in direct} == {"10.0.0.1", "192.0.2.1", "192.0.2.2"}
    host.pm.register(Wrapper(), "wrapper")  # a new implementation: resolved again
    order.clear()
    assert host.build_frontends(pc) == direct and Wrapper.calls == 1
    assert order == expected


class Switchable(FakeKernelDatapath):
    """A fake datapath that also follows svcproxy_datapath_changed."""

    def __init__(self, name: str, usable: bool = True, reason: str = "") -> None:
        super().__init__(name, usable, reason)
        self.changes: list[tuple[str, str, str]] = []

    @hookimpl
    def svcproxy_datapath_changed(self, datapath: str, previous: str, reason: str) -> None:
        self.changes.append((datapath, previous, reason))


def test_a_datapath_that_becomes_usable_takes_over_while_running() -> None:
    """`svcproxy run`'s DatapathWatch: the IPVS-like first datapath was
    unusable at start; once it probes usable it takes over with a full sync of
    everything, and the plugins hear of the switch. When it then fails its
    probe twice in a row, the next usable one takes over again."""
    from factories import endpoint, node, slice_

    from svcproxy.bus import Event, EventType
    from svcproxy.cli import DatapathWatch
    from svcproxy.model import parse_object
    from svcproxy.proxy import Proxy

    fast = Switchable("fast", usable=False, reason="fast module missing")
    slow = Switchable("slow")
    host = host_for("datapaths: [fast, slow]\n", extra_plugins=[("fast", fast),
                                                                  ("slow", slow)])
    name, _ = host.select_datapath()
    proxy = Proxy(host.config, host, "node-a", name, use_host_addresses=False)
    for obj in (node("node-a", ips=["192.168.1.10"]),
                service("web", cluster_ip="10.96.0.10",
                        ports=[{"name": "http", "port": 80, "protocol": "TCP"}]),
                slice_("web", endpoints=[endpoint("10.244.1.1", "node-a")])):
        proxy.bus.publish(Event(EventType.ADDED, parse_object(obj)))
    assert proxy.sync().ok and proxy.datapath == "slow" and len(slow.applied) == 1
    watch = DatapathWatch(host, proxy, 60.0)
    assert watch.check() is None  # nothing better yet: no switch, no sync
    assert proxy.sync().apply is None and fast.applied == []
    fast.usable = True
    assert watch.check() == "fast"
    result = proxy.sync()
    assert result.ok and result.full and result.datapath == "fast"
    assert fast.applied == [(1, fast.applied[0][1], True)]
    assert len(fast.applied[0][1].created) == 1  # everything, from scratch
    assert slow.changes == [("fast", "slow", "the fast datapath is usable now "
                                             "(before slow in the order)")]
    fast.usable, fast.reason = False, "fast module unloaded"
    assert watch.check() is None  # once may be a hiccup
    assert watch.check() == "slow"
    assert proxy.sync().datapath == "slow"
    assert fast.changes[-1] == ("slow", "fast", "the fast datapath stopped working: "
                                                "fast module unloaded")
