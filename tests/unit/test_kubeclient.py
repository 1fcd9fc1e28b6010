"""svcproxy's own API client (sources/kubeclient.py) against tests/apiserver.py
over real TLS: certificates made here with openssl, the server verifying
client certificates and bearer tokens, as a kube-apiserver does. Also the
kubeconfig rules kubectl has (merging, relative paths, tokenFile rotation,
exec plugins, in-cluster) and the errors that name the field."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import TLS, FakeAPIServer
from factories import endpoint, node, service, slice_, wait_for

from svcproxy.bus import Event
from svcproxy.errors import UsageError
from svcproxy.model import parse_service
from svcproxy.sources import kubeclient
from svcproxy.sources.kubeclient import Session, load_client
from svcproxy.sources.kubernetes import KubernetesSource, Reflector, Resource, RetryLater
from svcproxy.state import ClusterState


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, subject: str, ext: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
             "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; a server certificate for 127.0.0.1; one only for the in-cluster
    name; a client certificate; and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                 "-subj", f"/CN={ca}", cwd=d)
    _issue(d, "server", "/CN=kube-apiserver",
           "subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc")
    _issue(d, "named", "/CN=kube-apiserver", "subjectAltName=DNS:kubernetes.default.svc")
    _issue(d, "client", "/CN=system:kube-proxy",
           "extendedKeyUsage=clientAuth")
    return d


@pytest.fixture
def tls_server(pki: Path) -> Iterator[FakeAPIServer]:
    s = FakeAPIServer(tls=TLS(pki / "server.crt", pki / "server.key", client_ca=pki / "ca.crt"))
    s.apply(service("web", cluster_ip="10.96.0.10"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def session(server: FakeAPIServer, tmp_path: Path) -> Iterator[Session]:
    """A Session to the plain test server, closed after the test."""
    s = Session(load_client(str(server.kubeconfig(tmp_path / "kc"))))
    try:
        yield s
    finally:
        s.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def client_cert(pki: Path) -> dict[str, str]:
    return {"client-certificate-data": b64(pki / "client.crt"),
            "client-key-data": b64(pki / "client.key")}


def services_of(client: kubeclient.ApiClient) -> list[str]:
    """One list through a Reflector, as the source makes it."""
    published: list[Event] = []
    reflector = Reflector(Resource("services", "/api/v1/services", parse_service, "Service",
                                   "v1", {}), published.append, lambda name: None,
                          threading.Event(), resync_period=900, client=client)
    reflector.relist()
    return sorted(e.object.name for e in published)


def test_tls_with_ca_file_and_client_certificate(tls_server: FakeAPIServer, pki: Path,
                                                 tmp_path: Path) -> None:
    # a relative certificate-authority path is relative to the kubeconfig
    (tmp_path / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    kc = tls_server.kubeconfig(tmp_path / "kc", cluster={"certificate-authority": "ca.crt"},
                               user={"token": "test-token", **client_cert(pki)})
    assert services_of(load_client(str(kc))) == ["web"]


def test_tls_refusals_are_named(tls_server: FakeAPIServer, pki: Path, tmp_path: Path) -> None:
    # a server signed by another CA than the kubeconfig's
    kc = tls_server.kubeconfig(tmp_path / "kc", cluster={
        "certificate-authority-data": b64(pki / "other-ca.crt")},
        user={"token": "test-token", **client_cert(pki)})
    with pytest.raises(RetryLater, match=r"cannot reach the API server: "
                       r"SSLCertVerificationError.*CERTIFICATE_VERIFY_FAILED"):
        services_of(load_client(str(kc)))
    # no client certificate where the server requires one
    kc = tls_server.kubeconfig(tmp_path / "kc", cluster={
        "certificate-authority-data": b64(pki / "ca.crt")})
    with pytest.raises(RetryLater, match="cannot reach the API server"):
        services_of(load_client(str(kc)))
    # the right certificates, the wrong token
    kc = tls_server.kubeconfig(tmp_path / "kc", cluster={
        "certificate-authority-data": b64(pki / "ca.crt")},
        user={"token": "wrong", **client_cert(pki)})
    with pytest.raises(RetryLater, match="answered 401 Unauthorized"):
        services_of(load_client(str(kc)))


def test_tls_server_name_and_insecure_skip_verify(pki: Path, tmp_path: Path) -> None:
    """The server's certificate names only kubernetes.default.svc: dialing
    127.0.0.1 fails the hostname check unless tls-server-name says the name,
    or verification is off."""
    server = FakeAPIServer(tls=TLS(pki / "named.crt", pki / "named.key"))
    server.apply(service("web", cluster_ip="10.96.0.10"))
    try:
        ca = {"certificate-authority-data": b64(pki / "ca.crt")}
        kc = server.kubeconfig(tmp_path / "kc", cluster=ca)
        with pytest.raises(RetryLater, match=r"CERTIFICATE_VERIFY_FAILED.*IP address mismatch"):
            services_of(load_client(str(kc)))
        kc = server.kubeconfig(tmp_path / "kc", cluster={
            **ca, "tls-server-name": "kubernetes.default.svc"})
        assert services_of(load_client(str(kc))) == ["web"]
        kc = server.kubeconfig(tmp_path / "kc", cluster={"insecure-skip-tls-verify": True})
        assert services_of(load_client(str(kc))) == ["web"]
    finally:
        server.close()


def test_the_source_lists_and_watches_over_tls(tls_server: FakeAPIServer, pki: Path,
                                               tmp_path: Path) -> None:
    """The whole source, watch streams included, over TLS with a client
    certificate; one kept connection per reflector."""
    tls_server.apply(node("node-a"))
    tls_server.apply(slice_("web", endpoints=[endpoint("10.244.0.1", "node-a")]))
    kc = tls_server.kubeconfig(tmp_path / "kc", cluster={
        "certificate-authority-data": b64(pki / "ca.crt")},
        user={"token": "test-token", **client_cert(pki)})
    state = ClusterState("node-a")
    src = KubernetesSource(load_client(str(kc)), "node-a", state.apply, lambda name: None,
                           resync_period=3600, watch_timeout=(2, 3))
    try:
        src.start()
        wait_for(lambda: "default/web" in state.services and state.node is not None)
        tls_server.apply(service("late", cluster_ip="10.96.0.11"))
        wait_for(lambda: "default/late" in state.services, what="a watched ADDED")
        # the watch streams ran over TLS (no relist since the first lists)
        assert all(r.lists == 1 for r in src.reflectors)
        watches = [r for r in tls_server.requests if r.startswith("WATCH /api/v1/services")]
        assert watches
    finally:
        src.stop()


def test_a_kept_connection_carries_the_next_request(session: Session) -> None:
    json.loads(session.get_json("/api/v1/services"))
    first = session.conn
    json.loads(session.get_json("/api/v1/nodes"))
    assert first is not None and session.conn is first


def test_token_file_is_read_again_after_a_401(server: FakeAPIServer, tmp_path: Path) -> None:
    """A rotated service account token: the file is re-read every minute, and
    at once when the server answers 401."""
    token = tmp_path / "token"
    token.write_text("first\n")
    server.token = "first"
    client = load_client(str(server.kubeconfig(tmp_path / "kc",
                                               user={"tokenFile": "token"})))
    assert services_of(client) == []
    token.write_text("second\n")
    server.token = "second"
    with pytest.raises(RetryLater, match="401"):
        services_of(client)  # the minute is not over: the old token, refused
    assert services_of(client) == []  # the 401 made it read the file again


def test_exec_plugin_credential_is_kept_until_it_expires(server: FakeAPIServer,
                                                         tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent(f"""\
        import json, os, sys
        info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
        assert info["kind"] == "ExecCredential", info
        with open({str(runs)!r}, "a") as f:
            f.write(os.environ["WHO"] + "\\n")
        print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential",
                          "status": {{"token": "test-token",
                                      "expirationTimestamp": sys.argv[1]}}}}))
    """))

    def user(expires: str) -> dict[str, Any]:
        return {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                         "command": sys.executable, "args": [str(plugin), expires],
                         "env": [{"name": "WHO", "value": "svcproxy"}]}}

    client = load_client(str(server.kubeconfig(tmp_path / "kc",
                                               user=user("2999-01-01T00:00:00Z"))))
    services_of(client)
    services_of(client)
    assert runs.read_text() == "svcproxy\n"  # run once, kept
    runs.unlink()
    client = load_client(str(server.kubeconfig(tmp_path / "kc",
                                               user=user("2000-01-01T00:00:00Z"))))
    services_of(client)
    services_of(client)
    assert runs.read_text() == "svcproxy\nsvcproxy\n"  # expired: run per request


def test_in_cluster_service_account(tls_server: FakeAPIServer, pki: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No kubeconfig, KUBERNETES_SERVICE_HOST set: the mounted service account
    (token and CA) over https, as client-go's InClusterConfig."""
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("test-token")
    (sa / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    monkeypatch.setattr(kubeclient, "SERVICE_ACCOUNT", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_server.httpd.server_address[1]))
    client = load_client(None)
    assert client.server.startswith("https://127.0.0.1:")
    # the server wants a client certificate, which a pod does not have
    with pytest.raises(RetryLater, match="cannot reach"):
        services_of(client)
    server = FakeAPIServer(tls=TLS(pki / "server.crt", pki / "server.key"))
    try:
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.httpd.server_address[1]))
        server.apply(service("web", cluster_ip="10.96.0.10"))
        assert services_of(load_client(None)) == ["web"]
    finally:
        server.close()


def test_kubeconfig_env_files_are_merged(server: FakeAPIServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """$KUBECONFIG lists files; the first to name a thing (or to set
    current-context) wins, as kubectl merges them."""
    server.apply(service("web", cluster_ip="10.96.0.10"))
    first = tmp_path / "first"
    first.write_text(json.dumps({
        "current-context": "here",
        "contexts": [{"name": "here", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "test-token"}}]}))
    second = tmp_path / "second"
    second.write_text(json.dumps({
        "current-context": "elsewhere",
        "clusters": [{"name": "c", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "not-this-one"}}]}))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'absent'}:{second}")
    assert services_of(load_client(None)) == ["web"]


def _kc(cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """A kubeconfig whose context x uses cluster c (server https://h unless
    `cluster` says otherwise) and, when given, user u."""
    context: dict[str, str] = {"cluster": "c", **({"user": "u"} if user is not None else {})}
    out: dict[str, Any] = {
        "current-context": "x", "contexts": [{"name": "x", "context": context}],
        "clusters": [{"name": "c", "cluster": {"server": "https://h"} if cluster is None
                      else cluster}]}
    if user is not None:
        out["users"] = [{"name": "u", "user": user}]
    return out


H = "https://h"


@pytest.mark.parametrize(("config", "message"), [
    ({"clusters": []}, r"current-context is not set"),
    ({"current-context": "x"}, r"current-context 'x': no such context"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c"}}]},
     r"contexts\[x\].context.cluster: no cluster named 'c'"),
    (_kc({}), r"clusters\[c\].cluster.server: required"),
    (_kc({"server": "ftp://h"}),
     r"clusters\[c\].cluster.server: 'ftp://h' is not an http\(s\) URL"),
    (_kc({"server": H, "certificate-authority-data": "%%"}),
     r"clusters\[c\].cluster.certificate-authority-data: not base64"),
    (_kc({"server": H, "certificate-authority": "nope.crt"}),
     r"clusters\[c\].cluster.certificate-authority: cannot read .*nope.crt"),
    (_kc({"server": H, "certificate-authority-data": "YWJj"}),
     r"clusters\[c\].cluster.certificate-authority: cannot load it"),
    (_kc({"server": H, "proxy-url": "http://p:3128"}),
     r"clusters\[c\].cluster.proxy-url: not supported"),
    (_kc(user={"auth-provider": {"name": "gcp"}}), r"users\[u\].user.auth-provider: not supported"),
    (_kc(user={"client-certificate-data": "YWJj"}),
     r"users\[u\].user: client-certificate and client-key go together"),
    (_kc(user={"client-certificate-data": "YWJj", "client-key-data": "YWJj"}),
     r"users\[u\].user.client-certificate/client-key: cannot load them"),
    (_kc(user={"tokenFile": "missing"}), r"users\[u\].user.tokenFile: no such file"),
    ({"clusters": {"c": 1}}, r"clusters: expected a list"),
    ([1, 2], r"expected a Config mapping"),
])
def test_bad_kubeconfigs_name_the_field(tmp_path: Path, config: Any, message: str) -> None:
    kc = tmp_path / "kc"
    kc.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=f"--kubeconfig: cannot load .*{kc}.*{message}"):
        load_client(str(kc))


def test_an_api_error_is_read_whole_and_the_connection_kept(session: Session) -> None:
    """An error answer (its Status body read) does not poison the kept
    connection: the next request on it is served."""
    with pytest.raises(kubeclient.ApiError) as err:
        session.get_json("/api/v1/nothing-here")
    assert err.value.status == 404 and "could not find" in err.value.message
    conn = session.conn
    assert json.loads(session.get_json("/api/v1/services"))["kind"] == "ServiceList"
    assert session.conn is conn


def test_a_server_closing_an_idle_connection_is_retried_once(server: FakeAPIServer,
                                                              session: Session) -> None:
    session.get_json("/api/v1/services")
    # the server closes the kept connection while it idles
    import socket

    for conn in list(server.connections):
        conn.shutdown(socket.SHUT_RDWR)
    time.sleep(0.1)
    assert json.loads(session.get_json("/api/v1/services"))["kind"] == "ServiceList"
