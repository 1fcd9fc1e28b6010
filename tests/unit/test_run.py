"""`svcproxy run` end to end as a process: datapath fallback with its message,
--once, syncing as manifests change, and a clean stop on SIGTERM.

The datapaths here are small plugins installed through an entry point: the
real kernel datapaths have their own host and VM test tiers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import install_dist, wait_for

ROOT = Path(__file__).parents[2]
SVCPROXY = str(Path(sys.executable).parent / "svcproxy")

DATAPATHS = """
    import json, os
    from svcproxy import hookimpl
    from svcproxy.datapath import ApplyResult, ProbeResult

    class Broken:
        @hookimpl
        def svcproxy_list_datapaths(self):
            return ["broken"]

        @hookimpl
        def svcproxy_probe_datapath(self, name):
            if name == "broken":
                return ProbeResult.unusable("broken.ko kernel module missing")

    class FileDatapath:
        '''Writes each applied plan as one JSON line.'''

        @hookimpl
        def svcproxy_list_datapaths(self):
            return ["file"]

        @hookimpl
        def svcproxy_probe_datapath(self, name):
            if name == "file":
                return ProbeResult.ok()

        @hookimpl
        def svcproxy_apply_plan(self, name, plan, delta, full):
            if name != "file":
                return None
            if os.path.exists(os.environ["SVCPROXY_TEST_FAIL"]):
                raise OSError("kernel said no")
            with open(os.environ["SVCPROXY_TEST_OUT"], "a") as f:
                f.write(json.dumps({"full": full, "frontends": sorted(str(k) for k in
                                    plan.frontends), "created": len(delta.created),
                                    "deleted": len(delta.deleted)}) + "\\n")
            return ApplyResult(changes=len(delta))
"""

CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
iptables: {minSyncPeriod: 0s, syncPeriod: 1h}
---
apiVersion: svcproxy.io/v1alpha1
kind: SvcProxyConfiguration
datapaths: [broken, file]
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    install_dist(site, "svcproxy-testdp", {"broken": "svcproxy_testdp:Broken",
                                           "file": "svcproxy_testdp:FileDatapath"},
                 "svcproxy_testdp", DATAPATHS)
    (tmp_path / "config.yaml").write_text(CONFIG)
    shutil.copytree(ROOT / "examples" / "cluster", tmp_path / "cluster")
    return {**os.environ, "PYTHONPATH": str(site),
            "SVCPROXY_TEST_OUT": str(tmp_path / "applied.jsonl"),
            "SVCPROXY_TEST_FAIL": str(tmp_path / "fail")}


def applied(env: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    path = Path(env["SVCPROXY_TEST_OUT"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def args(tmp: Path, *extra: str) -> list[str]:
    return [SVCPROXY, "run", "--config", str(tmp / "config.yaml"), "--manifests",
            str(tmp / "cluster"), "--status-socket", str(tmp / "run" / "status.sock"), *extra]


def test_run_once_falls_back_with_one_plain_message(tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    proc = subprocess.run(args(tmp_path, "--once"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("broken datapath unusable: broken.ko kernel module missing; "
                             "using file") == 1
    (sync,) = applied(env)
    assert sync["full"] and "10.96.0.1:443/TCP" in sync["frontends"]
    assert len(sync["frontends"]) == sync["created"] == 16


def test_run_once_failure_exits_nonzero_with_reason(tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    Path(env["SVCPROXY_TEST_FAIL"]).touch()
    proc = subprocess.run(args(tmp_path, "--once"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "sync failed: OSError: kernel said no" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_follows_manifest_changes_and_stops_on_sigterm(tmp_path: Path,
                                                           env: dict[str, str]) -> None:
    proc = subprocess.Popen(args(tmp_path, "--poll-interval", "0.1"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(applied(env)) >= 1)
        assert applied(env)[0]["full"]
        (tmp_path / "cluster" / "12-cart-affinity.yaml").unlink()
        wait_for(lambda: len(applied(env)) >= 2)
        second = applied(env)[1]
        assert not second["full"] and second["deleted"] == 1
        assert "10.96.30.30:80/TCP" not in second["frontends"]
        # a failing apply is retried until it succeeds, without losing the change
        Path(env["SVCPROXY_TEST_FAIL"]).touch()
        (tmp_path / "cluster" / "11-storefront-nodeport.yaml").unlink()
        time.sleep(1.5)
        assert len(applied(env)) == 2
        Path(env["SVCPROXY_TEST_FAIL"]).unlink()
        wait_for(lambda: len(applied(env)) >= 3, timeout=30)
        third = applied(env)[2]
        assert third["full"] and "10.96.20.20:80/TCP" not in third["frontends"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert "received SIGTERM; stopping" in err and "Traceback" not in err
    assert ("failed; the previous rules stay in place and it is retried with backoff: "
            "OSError: kernel said no") in err


def test_status_socket_serves_the_plan_and_the_metrics_address_does_not(
        tmp_path: Path, env: dict[str, str]) -> None:
    """The plan names every service and endpoint: it is served to `svcproxy
    status` on a root-only unix socket, never on the metrics address (which the
    DaemonSet binds on 0.0.0.0 for Prometheus)."""
    import socket
    import stat
    import urllib.error
    import urllib.request

    from svcproxy.inspect import frontends_from_daemon
    from svcproxy.status import ask_socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    (tmp_path / "config.yaml").write_text(CONFIG.replace(
        "iptables:", f"metricsBindAddress: 127.0.0.1:{ports[0]}\n"
        f"healthzBindAddress: 127.0.0.1:{ports[1]}\niptables:"))
    sock = tmp_path / "run" / "status.sock"
    proc = subprocess.Popen(args(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(applied(env)) >= 1 and sock.exists())
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        wait_for(lambda: bool(ask_socket(sock, "/svcproxy/frontends")))
        plan = ask_socket(sock, "/svcproxy/frontends")
        assert {"address": "10.96.0.1", "port": 443} in [
            {"address": f["address"], "port": f["port"]} for f in plan]
        index, where = frontends_from_daemon(str(sock))
        assert index is not None and where == str(sock)
        assert index[("10.96.0.1", 443, "TCP")]["service"] == "default/kubernetes:https"
        status = ask_socket(sock, "/svcproxy/status")
        assert status["datapath"] == "file"
        assert status["fallbacks"] == [{"datapath": "broken",
                                        "reason": "broken.ko kernel module missing"}]
        metrics = f"http://127.0.0.1:{ports[0]}"
        with urllib.request.urlopen(f"{metrics}/metrics", timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{metrics}/svcproxy/frontends", timeout=5)
        assert exc.value.code == 404
        # a second svcproxy does not take the socket over: it says so and runs on
        second = subprocess.Popen(args(tmp_path), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert second.stderr is not None
            line = ""
            while "status" not in line:
                line = second.stderr.readline()
                assert line, "the second svcproxy exited"
            assert f"cannot serve `svcproxy status` on {sock}: another svcproxy answers" \
                in line
        finally:
            second.kill()
            second.communicate()
        assert ask_socket(sock, "/svcproxy/status")["datapath"] == "file"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not sock.exists()  # removed on a clean stop
    assert frontends_from_daemon(str(sock))[0] is None
