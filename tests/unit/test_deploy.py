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
        assert doc["kind"] == "ServiceMonitor"
        assert doc["spec"]["selector"]["matchLabels"]
        assert all("port" in e for e in doc["spec"]["endpoints"])
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
    assert c["securityContext"].get("privileged") is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/lib/modules", "/run/xtables.lock", "/etc/svcproxy"} <= mounts
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
