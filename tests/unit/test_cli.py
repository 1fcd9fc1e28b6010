"""The svcproxy command: plan, run --once, plugins, config check; exit codes and
messages for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from svcproxy.cli import main

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "cluster"
SVCPROXY = str(Path(sys.executable).parent / "svcproxy")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCPROXY, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_plan_example_cluster_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifests", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    for service in ("default/kubernetes:https", "kube-system/kube-dns:dns",
                    "kube-system/kube-dns:dns-tcp", "shop/web:http", "shop/storefront:http",
                    "shop/cart:http", "ingress-nginx/ingress:https", "edge/gateway:http",
                    "shop/checkout:grpc", "shop/search:http"):
        assert service in out, service
    for ignored in ("postgres", "billing-api"):
        assert ignored not in out
    assert "TCP  10.96.30.30:80 rr persistent 600" in out
    assert "NodePort shop/storefront:http" in out and "192.168.50.11:30080" in out
    assert "[fd00:10:96::80]:80" in out


def test_plan_example_cluster_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifests", str(EXAMPLE), "-o", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    required = {"address", "port", "protocol", "kind", "scheduler", "persistence_timeout",
                "service", "backends"}
    assert all(required <= set(f) for f in plan)
    assert all({"address", "port", "weight"} <= set(b) for f in plan for b in f["backends"])
    by = {(f["address"], f["port"], f["protocol"]): f for f in plan}
    lb = by[("203.0.113.10", 443, "TCP")]
    assert lb["kind"] == "LoadBalancer" and lb["source_ranges"] == ["198.51.100.0/24",
                                                                    "192.168.50.0/24"]
    local_lb = by[("203.0.113.20", 80, "TCP")]
    assert [b["address"] for b in local_lb["backends"]] == ["10.244.1.51"]
    checkout = by[("10.96.70.70", 9000, "TCP")]
    assert [b["address"] for b in checkout["backends"]] == ["10.244.2.72", "10.244.3.73"]
    assert not any(f["service"].startswith("db/") for f in plan)


def test_plan_for_another_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifests", str(EXAMPLE), "--node", "node-b", "-o", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not any(f["kind"] == "NodePort" for f in plan)  # node-b's Node object is absent
    web = next(f for f in plan if f["service"] == "shop/web:http")
    assert [b["local"] for b in web["backends"]] == [False, True, False]


def test_plan_unknown_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifests", str(EXAMPLE), "-o", "yamlish"]) == 2
    assert "--output 'yamlish': unknown format (available: table, json" in \
        capsys.readouterr().err


def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    broken = tmp / "broken"
    broken.mkdir()
    shutil.copy(EXAMPLE / "10-web.yaml", broken)
    (broken / "bad.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x\n")
    badport = tmp / "badport"
    badport.mkdir()
    (badport / "svc.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: api, namespace: prod}
        spec:
          clusterIP: 10.96.0.5
          ports:
            - {name: http, port: 0}
    """))
    typo = tmp / "typo.yaml"
    typo.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    "ipvs:\n  schedular: rr\n")
    duration = tmp / "duration.yaml"
    duration.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                        "kind: KubeProxyConfiguration\niptables:\n  syncPeriod: 30 seconds\n")
    scheduler = tmp / "scheduler.yaml"
    scheduler.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                         "kind: KubeProxyConfiguration\nmode: ipvs\nipvs:\n  scheduler: bogus\n")
    ex = str(EXAMPLE)
    return [
        (["plan", "--manifests", str(broken)], f"{broken / 'bad.yaml'}:4: invalid YAML"),
        (["plan", "--manifests", str(badport)],
         f"{badport / 'svc.yaml'}:7: Service prod/api: spec.ports[0].port: must be between 1 "
         "and 65535 (got 0)"),
        (["plan", "--manifests", ex, "--config", str(typo)],
         f"{typo}: line 4: unknown field ipvs.schedular; did you mean ipvs.scheduler?"),
        (["plan", "--manifests", ex, "--config", str(duration)],
         f"{duration}: line 4: iptables.syncPeriod: invalid duration '30 seconds'"),
        (["config", "check", str(typo)], "unknown field ipvs.schedular"),
        (["config", "check", str(scheduler)],
         f"{scheduler}: line 5: ipvs.scheduler: must be one of '', 'rr', 'wrr'"),
        (["run", "--once", "--manifests", ex, "--config", str(scheduler)],
         "ipvs.scheduler: must be one of"),
        (["plan", "--manifests", str(tmp / "nope")], "not a directory"),
        (["plan", "--manifests", ex, "--config", str(tmp / "missing.yaml")], "cannot read"),
        (["plan", "--kubeconfig", str(tmp / "nope.kubeconfig")],
         "or plan a manifest directory: --manifests DIR"),
        (["plan", "--manifests", ex, "--kubeconfig", "k"],
         "argument --kubeconfig: not allowed with argument --manifests"),
    ]


def test_bad_input_exits_2_with_one_clear_message(tmp_path: Path) -> None:
    for args, expected in bad_input_cases(tmp_path):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_config_check_prints_effective_values(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                   "mode: ipvs\nipvs: {minSyncPeriod: 5s}\n")
    assert main(["config", "check", str(cfg), "-o", "json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["effective"]["minSyncPeriod"] == "5s"
    assert values["effective"]["datapathOrder"] == ["ipvs", "nftables", "iptables"]


def test_plugins_lists_builtins_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    feature = [r["name"] for r in rows if r["role"] in ("feature", "essential")]
    assert feature == ["clusterip", "nodeport", "externalips", "loadbalancer", "affinity",
                       "metrics", "conntrack", "metallb"]
    assert rows[0]["origin"] == "built-in" and "build_frontends" in rows[0]["hooks"]


def test_run_once_without_a_usable_datapath_says_why(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                   "mode: nftables\n---\napiVersion: svcproxy.io/v1alpha1\n"
                   "kind: SvcProxyConfiguration\ndatapaths: []\n"
                   "datapathOptions: {nftables: {netns: svcproxy-no-such-netns}}\n")
    proc = run("run", "--once", "--manifests", str(EXAMPLE), "--config", str(cfg))
    assert proc.returncode == 1
    assert "no usable datapath: nftables:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def drain_plugin_installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install examples/svcproxy-drain-nodes with pip, as a user would, into a
    private target directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target),
                    str(ROOT / "examples" / "svcproxy-drain-nodes")], check=True, timeout=300)
    return target


def test_third_party_plugin_through_its_entry_point(drain_plugin_installed: Path,
                                                    tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(drain_plugin_installed)}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent("""\
        apiVersion: svcproxy.io/v1alpha1
        kind: SvcProxyConfiguration
        enable:
          - name: drain-nodes
            options: {nodes: [node-b]}
    """))
    proc = run("plugins", "--config", str(cfg), "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    drain = next(r for r in rows if r["name"] == "drain-nodes")
    assert drain["origin"] == "package svcproxy-drain-nodes 1.0.0"
    assert set(drain["hooks"]) == {"configure_plugin", "adjust_frontend"}

    proc = run("plan", "--manifests", str(EXAMPLE), "--config", str(cfg), "-o", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    web = next(f for f in json.loads(proc.stdout) if f["service"] == "shop/web:http")
    assert {b["address"]: b["weight"] for b in web["backends"]} == \
        {"10.244.1.11": 1, "10.244.2.12": 0, "10.244.3.13": 1}

    cfg.write_text(cfg.read_text().replace("nodes: [node-b]", "nodes: node-b"))
    proc = run("plan", "--manifests", str(EXAMPLE), "--config", str(cfg), env=env)
    assert proc.returncode == 2
    assert "enable[0].options: nodes: must be a list of node names" in proc.stderr
    # not installed -> unknown plugin, with what is installed
    proc = run("plugins", "--config", str(cfg))
    assert proc.returncode == 2 and "unknown plugin 'drain-nodes'" in proc.stderr


def test_plan_ipvsadm_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--manifests", str(EXAMPLE), "-o", "ipvsadm", "--datapath",
                 "ipvs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "-A -t 10.96.30.30:80 -s rr -p 600" in lines
    assert "-a -t 10.96.0.1:443 -r 192.168.50.2:6443 -m -w 1" in lines
    assert "-A -u 10.96.0.10:53 -s rr" in lines
    # Local policy: only the local endpoint behind the LoadBalancer IP
    assert [x for x in lines if x.startswith("-a -t 203.0.113.20:80")] == [
        "-a -t 203.0.113.20:80 -r 10.244.1.51:8080 -m -w 1"]


def test_run_applies_the_configs_logging_and_names_unused_settings(tmp_path: Path) -> None:
    """logging.format and .verbosity take effect (the flags would win), and each
    accepted setting svcproxy does not use is logged once at start."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                   "mode: nftables\nenableProfiling: true\n"
                   "logging: {format: json, verbosity: 4}\n---\n"
                   "apiVersion: svcproxy.io/v1alpha1\nkind: SvcProxyConfiguration\n"
                   "datapaths: []\n"
                   # no usable datapath: the run stops before programming anything
                   "datapathOptions: {nftables: {netns: svcproxy-no-such-netns}}\n")
    proc = run("run", "--once", "--manifests", str(EXAMPLE), "--config", str(cfg))
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    unused = [r for r in records if "accepted, not used by svcproxy" in r["msg"]]
    assert [r["msg"].split("=")[0] for r in unused] == ["enableProfiling"]
    assert proc.stderr.count("enableProfiling=") == 1
    assert "Traceback" not in proc.stderr


def test_logging_verbosity_and_the_flags() -> None:
    import argparse
    import logging

    from svcproxy.cli import _apply_process_settings
    from svcproxy.config import parse_config

    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        for flag, verbosity, level in ((None, 4, logging.DEBUG), (None, 2, logging.INFO),
                                       ("warning", 4, logging.WARNING)):
            config = parse_config("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                                  "kind: KubeProxyConfiguration\n"
                                  f"logging: {{verbosity: {verbosity}}}\n", "c.yaml")
            _apply_process_settings(argparse.Namespace(log_level=flag, log_format=None),
                                    config)
            assert root.level == level, (flag, verbosity)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
