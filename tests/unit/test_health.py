"""/healthz and /livez with kube-proxy's semantics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from factories import node

from svcproxy.bus import Event, EventType
from svcproxy.config import parse_config
from svcproxy.datapath import SyncResult
from svcproxy.manager import PluginHost
from svcproxy.model import parse_node
from svcproxy.plugins.metrics import MetricsPlugin, ProxyHealth


class Clock:
    t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_unhealthy_only_when_a_queued_update_is_older_than_the_timeout() -> None:
    clock = Clock()
    h = ProxyHealth(60.0, clock)
    assert h.status()[0]  # nothing pending: healthy, also at start-up
    h.queued_update()
    clock.t += 59
    assert h.status()[0]
    h.queued_update()  # does not move the oldest pending time
    clock.t += 2
    healthy, body = h.status()
    assert not healthy and body["status"]["IPv4"]["healthy"] is False
    h.updated()
    healthy, body = h.status()
    assert healthy and body["lastUpdated"] == body["currentTime"]


def test_node_eligibility() -> None:
    h = ProxyHealth(60.0)
    assert not h.node_eligible()  # no Node object yet
    h.node = parse_node(node("node-a"))
    assert h.node_eligible()
    raw = node("node-a")
    raw["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
    h.node = parse_node(raw)
    assert not h.node_eligible()
    raw = node("node-a")
    raw["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    h.node = parse_node(raw)
    assert not h.node_eligible()


def get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        data = exc.read()
        is_json = exc.headers.get("Content-Type") == "application/json"
        return exc.code, json.loads(data) if is_json else {}, dict(exc.headers)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_endpoints_over_http() -> None:
    config = parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                          "kind: KubeProxyConfiguration\n"
                          f"healthzBindAddress: 127.0.0.1:{free_port()}\n"
                          "iptables: {syncPeriod: 30s}\n", "c.yaml")
    plugin = MetricsPlugin()
    plugin.svcproxy_configure_plugin(config)
    clock = Clock()
    plugin.health.clock = clock
    plugin.svcproxy_start_proxy(config=config, datapath="iptables", skipped=[], node="node-a",
                                host=PluginHost(config))
    try:
        base = f"http://{plugin.address}"
        status, body, headers = get(base + "/livez")
        assert status == 200 and body["healthy"] is True
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, body, _ = get(base + "/healthz")
        assert status == 503 and body["nodeEligible"] is False  # Node not seen yet
        plugin.svcproxy_observe_event(Event(EventType.ADDED, parse_node(node("node-a"))))
        assert get(base + "/healthz")[0] == 200
        # a change is queued and no sync succeeds for more than 2 x syncPeriod
        plugin.svcproxy_observe_event(Event(EventType.ADDED, parse_node(node("node-b"))))
        from factories import service

        from svcproxy.model import parse_service
        plugin.svcproxy_observe_event(Event(EventType.ADDED, parse_service(service())))
        clock.t += 61
        assert get(base + "/livez")[0] == 503
        assert get(base + "/healthz")[0] == 503
        plugin.svcproxy_observe_sync(SyncResult("iptables", True, True, clock.t, 0.1))
        assert get(base + "/livez")[0] == 200 and get(base + "/healthz")[0] == 200
        assert get(base + "/nope")[0] == 404
        # every answer is counted, as kube-proxy counts them
        from prometheus_client import generate_latest
        text = generate_latest(plugin.metrics.registry).decode()
        assert 'kubeproxy_proxy_livez_total{code="503"} 1.0' in text
        assert 'kubeproxy_proxy_healthz_total{code="200"} 2.0' in text
    finally:
        plugin.svcproxy_stop_proxy()


def test_an_unspecified_healthz_address_serves_both_families() -> None:
    """healthzBindAddress 0.0.0.0:PORT (the default's shape) answers on IPv4 and,
    where the kernel has IPv6, on IPv6 too (it listened on IPv4 only)."""
    import socket

    import pytest

    port = free_port()
    config = parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                          "kind: KubeProxyConfiguration\n"
                          f"healthzBindAddress: 0.0.0.0:{port}\nmetricsBindAddress: ''\n",
                          "c.yaml")
    plugin = MetricsPlugin()
    plugin.svcproxy_configure_plugin(config)
    plugin.svcproxy_start_proxy(config=config, datapath="iptables", skipped=[], node="node-a",
                                host=PluginHost(config))
    try:
        assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here; the IPv4 half is checked")
        assert get(f"http://[::1]:{port}/livez")[0] == 200
    finally:
        plugin.svcproxy_stop_proxy()
