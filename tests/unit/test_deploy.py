"""deploy/: every manifest validates against the Kubernetes OpenAPI schema, and
the ConfigMap's embedded configuration passes svcproxy's own validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from svcproxy.config import parse_config
from svcproxy.manager import PluginHost

DEPLOY = Path(__file__).parents[2] / "deploy"
K8S_VERSION = "1.34.0"


def docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> dict[str, Any]:
    return next(d for _, d in docs() if d["kind"] == kind)


@pytest.mark.parametrize("name,doc", docs(), ids=lambda x: x if isinstance(x, str) else
                         x.get("kind", "?"))
def test_manifest_validates_against_the_openapi_schema(name: str, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        # a CRD: not in the Kubernetes schema; check the fields the operator needs
        # (the PrometheusRule's rules are checked by promtool: test_alert_rules.py)
        assert doc["kind"] in ("ServiceMonitor", "PrometheusRule")
        if doc["kind"] == "ServiceMonitor":
            assert doc["spec"]["selector"]["matchLabels"]
            assert all("port" in e for e in doc["spec"]["endpoints"])
        else:
            assert all(r["alert"] and r["expr"] for g in doc["spec"]["groups"]
                       for r in g["rules"])
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_configmap_config_passes_svcproxys_validation() -> None:
    cm = by_kind("ConfigMap")
    config = parse_config(yaml.safe_dump(cm), "deploy/configmap.yaml")
    assert config.kube_proxy.mode == "ipvs"
    assert config.svcproxy.datapaths == ("ipvs", "iptables")
    PluginHost(config).configure()  # every plugin it names exists and accepts its options


def test_daemonset_is_a_node_proxy() -> None:
    ds = by_kind("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    (c,) = spec["containers"]
    # privileges: tests/host/test_least_privilege.py runs svcproxy with them
    assert c["securityContext"]["privileged"] is False
    (init,) = spec["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {"/lib/modules", "/etc/svcproxy",
                                                            "/var/lib/svcproxy"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/run/xtables.lock", "/etc/svcproxy", "/var/lib/svcproxy", "/run/svcproxy"} <= mounts
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]


def test_rbac_allows_what_the_source_does() -> None:
    rules = by_kind("ClusterRole")["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in rules)

    for group, resource in (("", "services"), ("", "nodes"),
                            ("discovery.k8s.io", "endpointslices")):
        assert allowed(group, resource, "list") and allowed(group, resource, "watch")
    assert allowed("", "events", "create") and allowed("", "events", "patch")
    assert allowed("metallb.io", "ipaddresspools", "watch")


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_dockerfile_installs_the_kernel_tools() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for tool in ("iptables", "ipset", "ipvsadm", "conntrack"):
        assert tool in text


def dockerfile_sources() -> list[str]:
    """The build-context paths deploy/Dockerfile COPYs (the image's only inputs)."""
    out = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            out += words[1:-1]
    return out


def test_image_installs_from_exactly_the_files_the_dockerfile_copies(tmp_path: Path) -> None:
    """`docker build` cannot pull a base image here, so do its pip step by hand:
    a wheel from only the COPYed files, installed into a clean venv, runs."""
    import shutil
    import subprocess
    import sys
    import venv

    root = DEPLOY.parent
    src = tmp_path / "src"
    src.mkdir()
    for rel in dockerfile_sources():
        path = root / rel
        assert path.exists(), f"deploy/Dockerfile copies {rel}, which does not exist"
        if path.is_dir():
            shutil.copytree(path, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / rel)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("svcproxy-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin/python"),
                              "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # the dependencies come from this venv (no network here); svcproxy only from the wheel
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()
                and (Path(p) / "pluggy").is_dir())
    (site / "deps.pth").write_text(deps + "\n")
    exe = env_dir / "bin/svcproxy"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    where = subprocess.run([str(env_dir / "bin/python"), "-c",
                            "import svcproxy, svcproxy.demo; print(svcproxy.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(site)), where.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("svcproxy "), version.stderr
    plugins = run("plugins", "--config", str(DEPLOY / "configmap.yaml"), "-o", "json")
    assert plugins.returncode == 0, plugins.stderr
    import json
    names = [p["name"] for p in json.loads(plugins.stdout)]
    # every plugin the ConfigMap's settings need (conntrack.maxPerCore, the probes' /healthz)
    assert {"metrics", "conntrack", "metallb", "nodeport"} <= set(names)


def test_configmap_enables_every_plugin_its_settings_need() -> None:
    from svcproxy.config import PLUGIN_SETTINGS, setting_owners
    config = parse_config(yaml.safe_dump(by_kind("ConfigMap")), "deploy/configmap.yaml")
    enabled = {p.name for p in config.svcproxy.plugins}
    assert {plugin for _, plugin in PLUGIN_SETTINGS} <= enabled
    assert not [k for k, v in setting_owners(config).items() if "disabled" in v]


def test_state_directory_is_on_the_node() -> None:
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/svcproxy")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"] == {"path": "/var/lib/svcproxy", "type": "DirectoryOrCreate"}
    from svcproxy.plugins.kernel.sysctl import DEFAULT_BACKUP
    assert DEFAULT_BACKUP.startswith("/var/lib/svcproxy/")
    # and the status socket's directory, so `svcproxy status` works from the node
    from svcproxy.status import DEFAULT_SOCKET
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/run/svcproxy")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/run/svcproxy"
    assert DEFAULT_SOCKET.startswith("/run/svcproxy/")
