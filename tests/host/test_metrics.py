"""/metrics, scraped over HTTP and parsed with prometheus-client's parser after
real iptables syncs; healthCheckNodePort servers answering from the plan."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from conftest import Node
from factories import endpoint, service, slice_
from netns import Topology
from prometheus_client.parser import text_string_to_metric_families

from svcproxy.bus import EventType

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


V4 = (("ip_family", "IPv4"),)


def test_metrics_follow_real_syncs(topo: Topology) -> None:
    n = Node(topo, extra_config=f"metricsBindAddress: 127.0.0.1:{free_port()}\n"
                                f"healthzBindAddress: 127.0.0.1:{free_port()}", start=False)
    n.host.start("iptables", [("ipvs", "the ip_vs kernel module is not loaded")], "node-a")
    metrics = next(p.plugin for p in n.host.plugins if p.name == "metrics")
    try:
        address = metrics.metrics_address
        n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
        # the EndpointSlice controller's trigger time: the change happened 3 s ago
        triggered = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3)
        n.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")],
                         annotations={"endpoints.kubernetes.io/last-change-trigger-time":
                                      triggered.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        before = scrape(address)
        assert before[("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ())] == 1
        assert before[("kubeproxy_sync_proxy_rules_service_changes_total", ())] == 1
        assert before[("svcproxy_datapath_info", (("datapath", "iptables"),))] == 1
        assert before[("svcproxy_datapath_fallback_info", (
            ("datapath", "ipvs"), ("reason", "the ip_vs kernel module is not loaded")))] == 1
        n.sync(full=True)
        after = scrape(address)
        count = ("kubeproxy_sync_proxy_rules_duration_seconds_count", V4)
        assert after[count] == 1
        assert after[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", V4)] == 1
        assert after[("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ())] == 0
        assert after[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 1
        assert abs(after[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", V4)]
                   - time.time()) < 30
        # network programming latency: from the trigger time, so >= 3 s
        np_ = "kubeproxy_network_programming_duration_seconds_bucket"
        assert after[(np_, (("ip_family", "IPv4"), ("le", "2.0")))] == 0
        assert after[(np_, (("ip_family", "IPv4"), ("le", "30.0")))] == 1
        assert after[("svcproxy_frontends", V4)] == 1
        assert after[("svcproxy_backends", V4)] == 1
        assert after[("svcproxy_syncs_total", (("kind", "full"), ("outcome", "ok")))] == 1
        assert after[("svcproxy_sync_phase_duration_seconds_count", (
            ("kind", "full"), ("phase", "plan")))] == 1
        nat_rules = after[("kubeproxy_sync_proxy_rules_iptables_total",
                           (("ip_family", "IPv4"), ("table", "nat")))]
        assert nat_rules > 5
        assert after[("svcproxy_conntrack_max", ())] > 0
        assert ("svcproxy_conntrack_entries", ()) in after
        # a NodePort service with Local policy and no local endpoint
        n.publish(service("np", cluster_ip="10.96.0.20", type="NodePort",
                          externalTrafficPolicy="Local",
                          ports=[{**HTTP[0], "nodePort": 30090}]))
        n.publish(slice_("np", endpoints=[endpoint("10.244.2.12", "node-b")]))
        n.sync()
        third = scrape(address)
        assert third[count] == 2
        assert third[("kubeproxy_sync_partial_proxy_rules_duration_seconds_count", V4)] == 1
        assert third[("svcproxy_frontends", V4)] > 1
        assert third[("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                      (("ip_family", "IPv4"), ("traffic_policy", "external")))] == 1
        assert third[("kubeproxy_sync_proxy_rules_iptables_total",
                      (("ip_family", "IPv4"), ("table", "nat")))] > nat_rules
        # the plan (every service and endpoint) is not served here: `svcproxy
        # status` asks for it on a root-only unix socket (tests/unit/test_run.py)
        try:
            urllib.request.urlopen(f"http://{address}/svcproxy/frontends", timeout=5)
            raise AssertionError("/svcproxy/frontends is served on the metrics address")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        n.host.stop()


def test_health_check_node_port_servers(topo: Topology) -> None:
    port = free_port()
    n = Node(topo, extra_config=f"healthzBindAddress: 127.0.0.1:{free_port()}", start=False)
    n.host.start("iptables", [], "node-a")
    try:
        lb = service("lb", cluster_ip="10.96.0.30", type="LoadBalancer",
                     externalTrafficPolicy="Local", healthCheckNodePort=port,
                     ports=[{**HTTP[0], "nodePort": 30300}],
                     status={"loadBalancer": {"ingress": [{"ip": "203.0.113.30"}]}})
        n.publish(lb)
        n.publish(slice_("lb", endpoints=[endpoint("10.244.1.11", "node-a"),
                                          endpoint("10.244.1.12", "node-a"),
                                          endpoint("10.244.2.12", "node-b")]))
        n.sync()
        status, body, headers = get(f"http://127.0.0.1:{port}/")
        assert status == 200
        assert body == {"service": {"namespace": "default", "name": "lb"},
                        "localEndpoints": 2, "serviceProxyHealthy": True}
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"
        n.publish(slice_("lb", endpoints=[endpoint("10.244.2.12", "node-b")]),
                  EventType.MODIFIED)
        n.sync()
        status, body, _ = get(f"http://127.0.0.1:{port}/")
        assert status == 503 and body["localEndpoints"] == 0
        # the Service goes away: so does its server
        n.publish(lb, EventType.DELETED)
        n.sync()
        try:
            get(f"http://127.0.0.1:{port}/")
            raise AssertionError("the health check server still answers")
        except urllib.error.URLError:
            pass
    finally:
        n.host.stop()
