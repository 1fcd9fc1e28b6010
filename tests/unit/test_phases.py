"""Sync phases timed by the core's phase() timer: nested names, the sync's
phases as observers see them, nothing recorded outside a sync."""

from __future__ import annotations

from typing import Any

from factories import RecordingDatapath, endpoint, node, service, slice_

from svcproxy import hookimpl
from svcproxy.bus import Event, EventType
from svcproxy.config import parse_config
from svcproxy.datapath import ApplyResult
from svcproxy.manager import PluginHost
from svcproxy.model import parse_object
from svcproxy.phases import phase, recording
from svcproxy.proxy import Proxy


def test_phases_nest_and_add_up() -> None:
    with recording() as rec:
        with phase("read"):
            pass
        with phase("helpers"):
            for _ in range(2):
                with phase("ipset"):
                    pass
    names = [p.name for p in rec.phases]
    assert names == ["read", "helpers.ipset", "helpers.ipset", "helpers"]
    durations = rec.durations()
    assert list(durations) == ["read", "helpers", "helpers.ipset"]  # by start
    ipset = [p.duration for p in rec.phases if p.name == "helpers.ipset"]
    assert durations["helpers.ipset"] == sum(ipset)


def test_phase_outside_a_sync_records_nothing() -> None:
    with phase("orphan"):
        pass
    with recording() as rec:
        pass
    assert rec.phases == []


class TimedDatapath(RecordingDatapath):
    @hookimpl
    def svcproxy_apply_plan(self, name: str, plan: Any, delta: Any,
                            full: bool) -> ApplyResult | None:
        if name != self.name:
            return None
        with phase("read"):
            pass
        with phase("write"), phase("batch"):
            pass
        return ApplyResult(changes=1, phases={"legacy-step": 0.5})


def test_a_datapaths_phases_reach_the_sync_result() -> None:
    config = parse_config("apiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"
                          "datapaths: [recording]\n", "c.yaml")
    dp = TimedDatapath()
    host = PluginHost(config, extra_plugins=[("recording", dp)])
    host.configure()
    proxy = Proxy(config, host, "node-a", "recording", use_host_addresses=False)
    for obj in (node(), service("a"), slice_("a", endpoints=[endpoint("10.244.1.1")])):
        proxy.bus.publish(Event(EventType.ADDED, parse_object(obj)))
    result = proxy.sync()
    assert result.ok
    assert list(result.phases) == ["plan", "apply.read", "apply.write", "apply.write.batch",
                                   "apply.legacy-step", "apply"]
    assert result.phases["apply.legacy-step"] == 0.5
    assert result.phases["apply.write"] >= result.phases["apply.write.batch"]
