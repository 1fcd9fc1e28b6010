"""The shipped monitoring against a real Prometheus: Debian's prometheus scrapes
a svcproxy that programs a real node namespace, every query of
deploy/monitoring/grafana-dashboard.json returns a series, and the alert rules
of deploy/prometheusrule.yaml evaluate on the real series (the fallback alert
is pending, no other alert is)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Node
from factories import endpoint, service, slice_, wait_for
from netns import Topology
from test_metrics import free_port

DEPLOY = Path(__file__).parents[2] / "deploy"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, str, Callable[[], None]]]:
    """A config directory, the address Prometheus will listen on, and a function
    that starts it there (the test writes the config first); stopped afterwards."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is missing: scripts/install-deps.sh installs Debian's "
                    "prometheus package")
    conf = tmp_path / "prom"
    conf.mkdir()
    port = free_port()
    holder: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        holder["proc"] = subprocess.Popen(
            [exe, f"--config.file={conf / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))

    try:
        yield conf, f"http://127.0.0.1:{port}", start
    finally:
        proc = holder.get("proc")
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_dashboard_and_alerts_work_on_a_real_scrape(topo: Topology, prometheus: Any,
                                                    tmp_path: Path) -> None:
    conf, base, start = prometheus
    metrics_port, healthz_port = free_port(), free_port()
    n = Node(topo, extra_config=f"metricsBindAddress: 127.0.0.1:{metrics_port}\n"
                                f"healthzBindAddress: 127.0.0.1:{healthz_port}", start=False)
    # as `run` on a kernel without IPVS: ipvs skipped, iptables serving
    n.host.start("iptables", [("ipvs", "the ip_vs kernel module is not loaded")], "node-a")
    try:
        n.publish(service("web", cluster_ip="10.96.0.10", ports=HTTP))
        n.publish(service("np", cluster_ip="10.96.0.20", type="NodePort",
                          externalTrafficPolicy="Local", ports=[{**HTTP[0], "nodePort": 30090}]))
        n.publish(slice_("np", endpoints=[endpoint("10.244.2.12", "node-b")]))
        n.sync(full=True)
        triggered = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
        n.publish(slice_("web", endpoints=[endpoint("10.244.1.11", "node-a")],
                         annotations={"endpoints.kubernetes.io/last-change-trigger-time":
                                      triggered.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        n.sync()  # a partial sync, with network programming latency
        with urllib.request.urlopen(f"http://127.0.0.1:{healthz_port}/healthz", timeout=5):
            pass

        rules = yaml.safe_load((DEPLOY / "prometheusrule.yaml").read_text())["spec"]
        (conf / "rules.yaml").write_text(yaml.safe_dump(rules))
        (conf / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": "svcproxy-metrics", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }))
        start()
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200,
                 60, "Prometheus to be ready", interval=0.5, retry_on=(OSError,))
        wait_for(lambda: query(base, 'count_over_time(up{job="svcproxy-metrics"}[1m]) >= 5'),
                 60, "five scrapes of svcproxy", interval=0.5, retry_on=(OSError,))
        assert query(base, 'up{job="svcproxy-metrics"}')[0]["value"][1] == "1"

        dash = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
        empty = []
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = (target["expr"].replace("$__rate_interval", "30s")
                        .replace('instance=~"$instance"', 'instance=~".*"'))
                if not query(base, expr):
                    empty.append(f"{panel['title']}: {target['expr']}")
        assert not empty, "dashboard queries without a series:\n" + "\n".join(empty)
        variable = next(v for v in dash["templating"]["list"] if v["name"] == "instance")
        metric = variable["definition"].split("(")[1].split(",")[0]
        assert query(base, metric)[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"

        # the rules evaluate on the real series: the skipped datapath is pending
        # (it fires after its `for:`), nothing else is
        alerts = wait_for(lambda: query(base, "ALERTS"), 30, "the fallback alert",
                          interval=0.5, retry_on=(OSError,))
        assert {(a["metric"]["alertname"], a["metric"]["alertstate"]) for a in alerts} == {
            ("SvcProxyDatapathFellBack", "pending")}
        (fell_back,) = alerts
        assert fell_back["metric"]["datapath"] == "ipvs"
        assert fell_back["metric"]["reason"] == "the ip_vs kernel module is not loaded"
        # and each alert expression is a valid query over these series
        for rule in rules["groups"][0]["rules"]:
            query(base, rule["expr"])
    finally:
        n.host.stop()
