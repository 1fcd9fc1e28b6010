"""The tracing plugin: one span per real iptables sync, with its children, and
links from a sync back to the changes it applied (in-memory exporter)."""

from __future__ import annotations

import re
import textwrap

import pytest
from factories import ProxyHarness, endpoint, only_plugins, service, slice_
from netns import Topology
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from svcproxy.bus import EventType
from svcproxy.config import parse_config
from svcproxy.errors import ConfigError
from svcproxy.manager import PluginHost

HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def harness(topo: Topology) -> tuple[ProxyHarness, InMemorySpanExporter]:
    text = textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: iptables
        clusterCIDR: 10.244.0.0/16
        ---
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        {only_plugins("nodeport")}
        enable: [{{name: tracing, options: {{exporter: none}}}}]
        datapaths: [iptables]
        datapathOptions:
          iptables: {{netns: {topo.node}}}
          nftables: {{netns: {topo.node}}}
    """)
    h = ProxyHarness(text, "iptables", ["192.168.100.1"])
    tracing = next(p.plugin for p in h.host.plugins if p.name == "tracing")
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    return h, exporter


def test_one_span_per_sync_with_children_and_links(topo: Topology) -> None:
    h, exporter = harness(topo)
    h.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
    h.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")]))
    h.sync(full=True)
    spans = exporter.get_finished_spans()
    syncs = [s for s in spans if s.name.startswith("svcproxy.sync")]
    events = [s for s in spans if s.name == "svcproxy.event"]
    assert len(syncs) == 1
    root = syncs[0]
    assert root.name == "svcproxy.sync full"
    a = root.attributes
    assert a["svcproxy.datapath"] == "iptables" and a["svcproxy.sync.outcome"] == "ok"
    assert a["svcproxy.frontends.created"] == 1 and a["svcproxy.frontends"] == 1
    assert a["svcproxy.kernel_changes"] > 0
    # the Node, the Service and the slice: each change is linked from the sync
    assert {e.attributes["svcproxy.event.object"] for e in events} >= {"default/web"}
    # (the Node's event came before the exporter was attached)
    assert len(root.links) == 3
    assert {e.context.span_id for e in events} <= {link.context.span_id for link in root.links}
    children = {s.name: s for s in spans if s.parent and s.parent.span_id ==
                root.context.span_id}
    assert set(children) == {"plan", "apply"}
    apply = children["apply"]
    steps = [s for s in spans if s.parent and s.parent.span_id == apply.context.span_id]
    assert steps, "the datapath's steps are children of apply"
    for s in (*children.values(), *steps):
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time + 1_000_000

    # a partial sync: a new span, linked only to the new change
    exporter.clear()
    h.publish(slice_("web", endpoints=[endpoint("10.244.1.12", "node-a")]),
              EventType.MODIFIED)
    h.sync()
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name.startswith("svcproxy.sync")]
    assert root.name == "svcproxy.sync partial"
    assert root.attributes["svcproxy.frontends.updated"] == 1
    assert len(root.links) == 1


def test_bad_exporter_is_a_config_error() -> None:
    config = parse_config("apiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"
                          "enable: [{name: tracing, options: {exporter: jaeger}}]\n",
                          "c.yaml")
    with pytest.raises(ConfigError, match=re.escape(
            "c.yaml: enable[0].options: tracing: exporter must be one of none, console, otlp "
            "(got 'jaeger')")):
        PluginHost(config).configure()
