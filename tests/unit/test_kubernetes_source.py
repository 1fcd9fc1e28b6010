"""The Kubernetes source with its real API client against an in-process
server that speaks the API's list/watch wire protocol, including its faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeAPIServer
from factories import endpoint, node, service, slice_, wait_for

from svcproxy.bus import Event
from svcproxy.model import parse_endpoint_slice, parse_node, parse_service
from svcproxy.sources import kubernetes as k8s
from svcproxy.sources.kubeclient import load_client
from svcproxy.sources.kubernetes import KubernetesSource
from svcproxy.state import ClusterState


class Recorder:
    """Collects what the source publishes into a ClusterState, as the bus does."""

    def __init__(self) -> None:
        self.state = ClusterState("node-a")
        self.events: list[str] = []
        self.synced: list[str] = []

    def publish(self, event: Event) -> None:
        self.events.append(str(event))
        self.state.apply(event)

    def mark_synced(self, name: str) -> None:
        self.synced.append(name)


@pytest.fixture
def source(server: FakeAPIServer, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KubernetesSource, Recorder]]:
    monkeypatch.setattr(k8s, "PAGE_SIZE", 2)  # exercise paging with few objects
    monkeypatch.setattr(k8s.Backoff, "base", 0.05)
    rec = Recorder()
    api = load_client(str(server.kubeconfig(tmp_path / "kubeconfig")))
    src = KubernetesSource(api, "node-a", rec.publish, rec.mark_synced, resync_period=3600,
                           watch_timeout=(2, 3))
    try:
        yield src, rec
    finally:
        src.stop()


def server_state(server: FakeAPIServer) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    snap = server.snapshot()
    svcs = {}
    for raw in snap["services"].values():
        labels = raw["metadata"].get("labels") or {}
        if "service.kubernetes.io/service-proxy-name" in labels:
            continue
        s = parse_service(raw)
        svcs[s.key] = s
    slices = {}
    for raw in snap["endpointslices"].values():
        if "service.kubernetes.io/headless" in (raw["metadata"].get("labels") or {}):
            continue
        e = parse_endpoint_slice(raw)
        slices[e.key] = e
    nodes = {n.name: n for n in (parse_node(r) for r in snap["nodes"].values())
             if n.name == "node-a"}
    return svcs, slices, nodes


def converged(server: FakeAPIServer, rec: Recorder) -> bool:
    svcs, slices, nodes = server_state(server)
    return (rec.state.services == svcs and rec.state.slices == slices
            and rec.state.nodes == nodes)


def populate(server: FakeAPIServer, n: int = 5) -> None:
    server.apply(node("node-a"))
    server.apply(node("node-b"))
    for i in range(n):
        server.apply(service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}"))
        server.apply(slice_(f"s{i}", endpoints=[endpoint(f"10.244.0.{i + 1}", "node-a")]))


def test_initial_lists_then_watch(server: FakeAPIServer, source: Any) -> None:
    src, rec = source
    populate(server)
    other = service("other", cluster_ip="10.96.9.9",
                    labels={"service.kubernetes.io/service-proxy-name": "someone-else"})
    server.apply(other)
    headless = slice_("hl", endpoints=[endpoint("10.244.9.9")])
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    server.apply(headless)
    src.start()
    wait_for(lambda: {"services", "endpointslices"} <= set(rec.synced))
    assert converged(server, rec)
    assert "default/other" not in rec.state.services  # server-side label selector
    assert set(rec.state.nodes) == {"node-a"}  # field selector: this node only
    assert any("LIST /api/v1/services" in r for r in server.requests)
    # paging: 5 services + 1 filtered in pages of 2
    assert sum(1 for r in server.requests if r == "LIST /api/v1/services") >= 3

    rec.events.clear()
    server.apply(service("s9", cluster_ip="10.96.0.99"))
    server.apply(slice_("s1", endpoints=[endpoint("10.244.0.50", "node-a")]))
    server.delete(service("s2"))
    n = node("node-a", ips=["192.168.1.99"])
    server.apply(n)
    wait_for(lambda: converged(server, rec))
    assert sorted(rec.events) == sorted([
        "ADDED Service default/s9", "MODIFIED EndpointSlice default/s1-abc",
        "DELETED Service default/s2", "MODIFIED Node node-a"])


def test_gone_relists_and_reports_only_real_differences(server: FakeAPIServer,
                                                        source: Any) -> None:
    src, rec = source
    populate(server)
    src.start()
    wait_for(lambda: converged(server, rec))
    rec.events.clear()
    lists = src.reflectors[0].lists
    # the watch is cut off and cannot come back at once; meanwhile history is
    # compacted, so when it does, its resourceVersion is gone: 410, relist
    server.fail("/api/v1/services", 500, count=2, watch_only=True)
    server.drop_watches()
    server.compact()
    server.delete(service("s3"))
    server.apply(service("s4", cluster_ip="10.96.0.44"))
    server.apply(service("s0", cluster_ip="10.96.0.1"))  # same content, new resourceVersion
    server.compact()
    wait_for(lambda: converged(server, rec))
    assert sorted(e for e in rec.events if "Service " in e) == [
        "DELETED Service default/s3", "MODIFIED Service default/s4"]
    assert src.reflectors[0].lists > lists


def test_stream_dropped_mid_event_loses_nothing(server: FakeAPIServer, source: Any) -> None:
    src, rec = source
    populate(server, 2)
    src.start()
    wait_for(lambda: converged(server, rec))
    rec.events.clear()
    server.drop_watch_mid_event = 3
    for i in range(6):
        server.apply(service(f"new{i}", cluster_ip=f"10.96.1.{i}"))
    wait_for(lambda: converged(server, rec))
    assert sorted(rec.events) == sorted(f"ADDED Service default/new{i}" for i in range(6))


def test_server_restart_with_newer_resource_version(server: FakeAPIServer,
                                                    source: Any) -> None:
    src, rec = source
    populate(server, 3)
    src.start()
    wait_for(lambda: converged(server, rec))
    lists = [r.lists for r in src.reflectors]
    server.restart()
    server.delete(service("s1"))
    server.apply(service("s7", cluster_ip="10.96.0.77"))
    wait_for(lambda: converged(server, rec))
    assert all(r.lists > n for r, n in zip(src.reflectors[:1], lists, strict=False))


def test_errors_back_off_and_honour_retry_after(server: FakeAPIServer, source: Any) -> None:
    src, rec = source
    populate(server, 2)
    server.fail("/api/v1/services", 429, count=1, **{"Retry-After": "1"})
    server.fail("/apis/discovery.k8s.io/v1/endpointslices", 500, count=3)
    started = time.monotonic()
    src.start()
    wait_for(lambda: {"services", "endpointslices"} <= set(rec.synced))
    assert time.monotonic() - started >= 1.0  # waited as Retry-After asked
    assert converged(server, rec)


def test_slow_server_still_converges(server: FakeAPIServer, source: Any) -> None:
    src, rec = source
    populate(server, 3)
    server.delay = 0.3
    src.start()
    server.apply(service("late", cluster_ip="10.96.3.3"))
    wait_for(lambda: converged(server, rec), timeout=30)


def test_fallback_posts_a_warning_event_on_the_node(server: FakeAPIServer,
                                                    source: Any) -> None:
    src, _ = source
    src.svcproxy_start_proxy(datapath="iptables",
                             skipped=[("ipvs", "the ip_vs kernel module is not loaded")])
    (event,) = server.posted_events
    assert event["type"] == "Warning" and event["reason"] == "DatapathFallback"
    assert event["involvedObject"]["kind"] == "Node"
    assert event["involvedObject"]["name"] == "node-a"
    assert event["message"] == ("ipvs datapath unusable: the ip_vs kernel module is not "
                                "loaded; using iptables")
    assert event["source"]["component"] == "svcproxy"


def test_bad_kubeconfig_is_a_usage_error(tmp_path: Path) -> None:
    from svcproxy.errors import UsageError

    bad = tmp_path / "kc"
    for text in ("apiVersion: v1\nkind: Config\nclusters: []\n", "not: [yaml"):
        bad.write_text(text)
        with pytest.raises(UsageError, match="--kubeconfig: cannot load"):
            load_client(str(bad))
    with pytest.raises(UsageError, match="--kubeconfig: cannot load"):
        load_client(str(tmp_path / "missing"))


def test_api_server_gone_for_a_while_then_back(server: FakeAPIServer, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The API server goes away (every connection closed, new ones refused)
    while the cluster changes, then comes back. Meanwhile what was listed
    stays served (no event), every failed request is reported (the metrics
    count them) but logged once per resource, the retries back off (a few per
    second at most, not a busy loop), and once it is back the source
    converges on the changes it missed and says so once per resource."""
    import logging

    populate(server, 3)
    rec = Recorder()
    errors: list[tuple[str, str]] = []
    api = load_client(str(server.kubeconfig(tmp_path / "kubeconfig")))
    src = KubernetesSource(api, "node-a", rec.publish, rec.mark_synced, resync_period=3600,
                           watch_timeout=(20, 30), backoff_cap=0.6,
                           on_error=lambda r, m: errors.append((r, m)))
    caplog.set_level(logging.INFO, logger="svcproxy.sources.kubernetes")
    try:
        src.start()
        wait_for(lambda: converged(server, rec))
        seen = len(rec.events)
        server.go_away()
        server.apply(service("new", cluster_ip="10.96.9.9"))
        server.delete(slice_("s0", endpoints=[]))
        time.sleep(3.0)
        assert len(rec.events) == seen  # nothing withdrawn, nothing invented
        assert len(rec.state.slices) == 3
        per = {r: sum(1 for x, _ in errors if x == r) for r in ("services", "endpointslices",
                                                               "nodes")}
        assert all(2 <= n <= 12 for n in per.values()), per  # retried, backing off
        warned = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and "cannot reach" in r.getMessage()]
        assert sorted(m.split(":")[0] for m in warned) == ["endpointslices", "nodes",
                                                           "services"], warned
        server.come_back()
        wait_for(lambda: converged(server, rec), timeout=10)
        assert "default/new" in rec.state.services and len(rec.state.slices) == 2
        # each reflector is back on its own schedule (the next retry)
        wait_for(lambda: sum("answers again" in r.getMessage() for r in caplog.records) >= 3)
        back = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
        assert len(back) == 3, back
    finally:
        src.stop()
