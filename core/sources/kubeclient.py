"""svcproxy's own Kubernetes API client: what the Kubernetes source needs and
nothing more. It loads a kubeconfig (or the in-cluster service account),
makes JSON GETs and POSTs and streams watch responses line by line, over
http.client and ssl from the standard library.

The `kubernetes` client library did this before; importing it cost 22 MB of
resident memory (its ~700 generated model classes, urllib3, pydantic through
its config loader) and 0.3 s natively, several seconds in the emulated VM, on
every node (issue #16's memory budget). svcproxy used only its config loading
and its HTTP calls, with raw JSON responses.

What a kubeconfig may say (kubectl's meaning):
- clusters: ``server`` (https or http, with an optional path prefix),
  ``certificate-authority`` / ``certificate-authority-data``,
  ``insecure-skip-tls-verify``, ``tls-server-name``;
- users: ``token``, ``tokenFile`` (read again every minute: bound service
  account tokens rotate), ``client-certificate`` / ``client-certificate-data``
  with ``client-key`` / ``client-key-data``, ``username`` / ``password``, and
  ``exec`` credential plugins (client.authentication.k8s.io ExecCredential;
  the credential is kept until its expirationTimestamp or a 401);
- contexts and ``current-context``; ``$KUBECONFIG`` may list several files,
  merged as kubectl merges them (the first file to name a thing wins).
Relative file paths are relative to the kubeconfig's directory. A cluster
``proxy-url`` and the deprecated ``auth-provider`` are refused by name rather
than ignored.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml

from ..errors import UsageError, show

#: where a pod's service account is mounted (tests point it elsewhere)
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: how long a token file's content is used before it is read again (client-go
#: and the Python client both re-read every minute)
TOKEN_FILE_TTL = 60.0
USER_AGENT = "svcproxy/0.1.0"


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str],
                 message: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))
        self.status = status
        self.reason = reason
        self.headers = dict(headers)
        self.message = message


class KubeconfigError(Exception):
    """A kubeconfig that cannot be used; the text names the field."""


# -- credentials ----------------------------------------------------------------------


@dataclass
class Credential:
    """What one request authenticates with: a header and/or a client certificate
    (PEM), valid until `expires` (monotonic; inf when it does not expire)."""

    header: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    expires: float = float("inf")


@dataclass
class ExecPlugin:
    """A client.authentication.k8s.io credential plugin (kubectl's `exec`)."""

    command: str
    args: list[str]
    env: dict[str, str]
    api_version: str
    where: str  # for errors: users[NAME].user.exec

    def run(self) -> Credential:
        info = {"apiVersion": self.api_version, "kind": "ExecCredential",
                "spec": {"interactive": False}}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            out = subprocess.run([self.command, *self.args], env=env, capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(f"{self.where}: cannot run {self.command!r}: {exc}") from None
        if out.returncode != 0:
            raise OSError(f"{self.where}: {self.command!r} exited {out.returncode}: "
                          f"{out.stderr.strip()[-300:]}")
        try:
            status = json.loads(out.stdout)["status"]
        except (ValueError, KeyError, TypeError):
            raise OSError(f"{self.where}: {self.command!r} did not print an ExecCredential "
                          "with a status") from None
        cred = Credential()
        if isinstance(status.get("token"), str) and status["token"]:
            cred.header = f"Bearer {status['token']}"
        if status.get("clientCertificateData") and status.get("clientKeyData"):
            cred.cert_pem = str(status["clientCertificateData"]).encode()
            cred.key_pem = str(status["clientKeyData"]).encode()
        if cred.header is None and cred.cert_pem is None:
            raise OSError(f"{self.where}: the ExecCredential has neither a token nor a "
                          "client certificate")
        stamp = status.get("expirationTimestamp")
        if isinstance(stamp, str) and stamp:
            with contextlib.suppress(ValueError):
                at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                left = at.timestamp() - time.time()
                # renewed a little before it expires
                cred.expires = time.monotonic() + max(0.0, left - 10.0)
        return cred


@dataclass
class Auth:
    """How requests authenticate; the current credential is cached."""

    token: str | None = None
    token_file: Path | None = None
    basic: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    plugin: ExecPlugin | None = None
    _cached: Credential | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> Credential:
        with self._lock:
            if self._cached is None or time.monotonic() >= self._cached.expires:
                self._cached = self._fresh()
            return self._cached

    def invalidate(self) -> None:
        """After a 401: read the token file or run the plugin again."""
        with self._lock:
            self._cached = None

    def _fresh(self) -> Credential:
        if self.plugin is not None:
            return self.plugin.run()
        cred = Credential(cert_pem=self.cert_pem, key_pem=self.key_pem)
        if self.token:
            cred.header = f"Bearer {self.token}"
        elif self.token_file is not None:
            token = self.token_file.read_text().strip()
            cred.header = f"Bearer {token}"
            cred.expires = time.monotonic() + TOKEN_FILE_TTL
        elif self.basic:
            cred.header = f"Basic {self.basic}"
        return cred


# -- the client -----------------------------------------------------------------------


@dataclass
class ApiClient:
    """One API server: where it is, how to trust it and how to authenticate."""

    server: str
    auth: Auth
    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    server_name: str | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise KubeconfigError(f"server: {show(self.server)} is not an http(s) URL")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._contexts: dict[tuple[bytes, bytes] | None, ssl.SSLContext] = {}
        self._ctx_lock = threading.Lock()
        if self.scheme == "https":
            self.ssl_context(None)  # a bad CA is reported when loading, not later

    def ssl_context(self, cert: tuple[bytes, bytes] | None) -> ssl.SSLContext:
        """The TLS context for this server with `cert` (PEM certificate and
        key) as the client certificate, made once per certificate."""
        with self._ctx_lock:
            ctx = self._contexts.get(cert)
            if ctx is None:
                ctx = self._make_context(cert)
                if len(self._contexts) >= 4:  # an exec plugin's rotated certificates
                    self._contexts.clear()
                self._contexts[cert] = ctx
            return ctx

    def _make_context(self, cert: tuple[bytes, bytes] | None) -> ssl.SSLContext:
        if self.insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
            except (ssl.SSLError, OSError) as exc:
                raise KubeconfigError(f"certificate-authority: cannot load it: {exc}") \
                    from None
        if cert is not None:
            _load_cert_chain(ctx, *cert)
        return ctx

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new connection, not yet opened."""
        if self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        cred = self.auth.current()
        cert = (cred.cert_pem, cred.key_pem) if cred.cert_pem and cred.key_pem else None
        return _HTTPSConnection(self.host, self.port, timeout=timeout,
                                context=self.ssl_context(cert),
                                server_name=self.server_name or self.host)

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        full = self.prefix + path
        if query:
            full += "?" + urlencode({k: _query_value(v) for k, v in query.items()
                                     if v is not None})
        return full


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _HTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose TLS server name may differ from the host it
    dials (a kubeconfig's tls-server-name)."""

    def __init__(self, host: str, port: int, *, timeout: float, context: ssl.SSLContext,
                 server_name: str) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._ctx = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._ctx.wrap_socket(self.sock, server_hostname=self._server_name)


def _load_cert_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl only loads a client certificate from files: written to a private
    temporary directory and removed at once."""
    with tempfile.TemporaryDirectory(prefix="svcproxy-cert-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        except (ssl.SSLError, OSError) as exc:
            raise KubeconfigError(f"client-certificate/client-key: cannot load them: "
                                  f"{exc}") from None


class Session:
    """Sequential requests to the API server over one kept connection (a
    reflector's lists and watches). `shutdown` may be called from another
    thread to end a blocked read."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None

    def request(self, method: str, path: str, query: Mapping[str, Any] | None = None,
                body: Any = None, timeout: tuple[float, float] = (30.0, 30.0)
                ) -> http.client.HTTPResponse:
        """Send one request and return the response once its headers are in;
        an error status raises ApiError, a connection failure OSError or
        http.client.HTTPException. The previous response must be consumed."""
        url = self.client.url(path, query)
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            reused = self.conn is not None
            try:
                resp = self._send(method, url, data, timeout)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest):
                self.close()
                # a kept connection the server closed while idle: once more on a
                # fresh one (GETs only: a POST may have been taken)
                if reused and attempt == 0 and method == "GET":
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if resp.status >= 300:
                self._raise(resp)
            self.resp = resp
            return resp
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, data: bytes | None,
              timeout: tuple[float, float]) -> http.client.HTTPResponse:
        if self.conn is None:
            self.conn = self.client.connect(timeout[0])
            self.conn.connect()
        sock = self.conn.sock
        if sock is not None:
            sock.settimeout(timeout[1])
        cred = self.client.auth.current()
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if cred.header:
            headers["Authorization"] = cred.header
        if data is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, url, body=data, headers=headers)
        return self.conn.getresponse()

    def _raise(self, resp: http.client.HTTPResponse) -> None:
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        if resp.will_close:
            self.close()
        if resp.status == 401:
            self.client.auth.invalidate()
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            status = json.loads(raw)
            message = str(status.get("message") or "")
        raise ApiError(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()},
                       message)

    def get_json(self, path: str, query: Mapping[str, Any] | None = None,
                 timeout: float = 30.0) -> bytes:
        """The body of a GET, whole."""
        resp = self.request("GET", path, query, timeout=(timeout, timeout))
        return self.finish(resp)

    def finish(self, resp: http.client.HTTPResponse) -> bytes:
        try:
            data = resp.read()
        except BaseException:
            self.close()
            raise
        self._done(resp)
        return data

    def _done(self, resp: http.client.HTTPResponse) -> None:
        """A response read to its end: the connection is free for the next
        request, unless the server closes it."""
        self.resp = None
        if resp.will_close:
            self.close()

    def lines(self, resp: http.client.HTTPResponse) -> Iterator[bytes]:
        """Complete lines of a streamed (chunked) response. A partial line at
        the end (the connection dropped mid-event) is dropped."""
        try:
            while True:
                line = resp.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    break  # cut off mid-line
                if line.strip():
                    yield line
        except BaseException:
            self.close()
            raise
        self._done(resp)

    def release(self) -> None:
        """After a response that was not read to its end: the connection
        cannot carry another request."""
        if self.resp is not None:
            self.close()

    def close(self) -> None:
        conn, self.conn, self.resp = self.conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def shutdown(self) -> None:
        """End a read blocked in another thread (that thread then closes)."""
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def event_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/events"


# -- loading --------------------------------------------------------------------------


def load_client(kubeconfig: str | None) -> ApiClient:
    """An ApiClient from a kubeconfig file, else the in-cluster service
    account, else $KUBECONFIG or ~/.kube/config. Raises UsageError naming
    what is wrong."""
    try:
        if kubeconfig:
            return from_kubeconfig([Path(kubeconfig)])
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return in_cluster()
        env = os.environ.get("KUBECONFIG")
        paths = [Path(p) for p in env.split(os.pathsep) if p] if env else \
            [Path.home() / ".kube" / "config"]
        present = [p for p in paths if p.exists()]
        if not present:
            raise KubeconfigError("no such file: " + ", ".join(map(str, paths)))
        return from_kubeconfig(present)
    except (KubeconfigError, OSError, yaml.YAMLError) as exc:
        where = kubeconfig or "in-cluster config, $KUBECONFIG or ~/.kube/config"
        raise UsageError(f"--kubeconfig: cannot load a Kubernetes client config from "
                         f"{where}: {exc}") from None


def in_cluster() -> ApiClient:
    """The pod's service account, as client-go's rest.InClusterConfig."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = SERVICE_ACCOUNT / "token"
    ca = SERVICE_ACCOUNT / "ca.crt"
    if not token.is_file():
        raise KubeconfigError(f"in-cluster: no service account token at {token}")
    if ":" in host:
        host = f"[{host}]"
    return ApiClient(f"https://{host}:{port}", Auth(token_file=token),
                     ca_file=str(ca) if ca.is_file() else None)


def _named(doc: Mapping[str, Any], section: str, inner: str, origin: Path,
           into: dict[str, tuple[dict[str, Any], Path]]) -> None:
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise KubeconfigError(f"{origin}: {section}: expected a list, got {show(entries)}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise KubeconfigError(f"{origin}: {section}[{i}]: expected a mapping with a "
                                  "name")
        body = entry.get(inner) or {}
        if not isinstance(body, Mapping):
            raise KubeconfigError(f"{origin}: {section}[{entry['name']}].{inner}: expected "
                                  f"a mapping, got {show(body)}")
        into.setdefault(entry["name"], (dict(body), origin))


def from_kubeconfig(paths: list[Path]) -> ApiClient:
    """Merge kubeconfig files (the first to name a cluster, user or context, or
    to set current-context, wins) and build the current context's client."""
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    contexts: dict[str, tuple[dict[str, Any], Path]] = {}
    current = ""
    for path in paths:
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise KubeconfigError(f"{path}: expected a Config mapping, got {show(doc)}")
        _named(doc, "clusters", "cluster", path, clusters)
        _named(doc, "users", "user", path, users)
        _named(doc, "contexts", "context", path, contexts)
        current = current or str(doc.get("current-context") or "")
    where = ", ".join(map(str, paths))
    if not current:
        raise KubeconfigError(f"{where}: current-context is not set")
    if current not in contexts:
        raise KubeconfigError(f"{where}: current-context {show(current)}: no such context")
    ctx, _ = contexts[current]
    cname = ctx.get("cluster")
    if cname not in clusters:
        raise KubeconfigError(f"{where}: contexts[{current}].context.cluster: no cluster "
                              f"named {show(cname)}")
    uname = ctx.get("user")
    if uname and uname not in users:
        raise KubeconfigError(f"{where}: contexts[{current}].context.user: no user named "
                              f"{show(uname)}")
    cluster, cpath = clusters[cname]
    user, upath = users[uname] if uname else ({}, cpath)
    uwhere = f"{upath}: users[{uname}].user"
    return _client(cluster, f"{cpath}: clusters[{cname}].cluster", cpath.parent,
                   _auth(user, uwhere, upath.parent), uwhere)


def _file_or_data(body: Mapping[str, Any], key: str, where: str, base: Path) -> bytes | None:
    data = body.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except ValueError:
            raise KubeconfigError(f"{where}.{key}-data: not base64") from None
    name = body.get(key)
    if name:
        path = base / str(name)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise KubeconfigError(f"{where}.{key}: cannot read {path}: {exc.strerror}") \
                from None
    return None


def _auth(user: Mapping[str, Any], where: str, base: Path) -> Auth:
    if user.get("auth-provider"):
        raise KubeconfigError(f"{where}.auth-provider: not supported (deprecated since "
                              "Kubernetes 1.22; use an exec credential plugin)")
    auth = Auth()
    if user.get("token"):
        auth.token = str(user["token"])
    elif user.get("tokenFile"):
        auth.token_file = base / str(user["tokenFile"])
        if not auth.token_file.is_file():
            raise KubeconfigError(f"{where}.tokenFile: no such file: {auth.token_file}")
    elif user.get("username"):
        pair = f"{user['username']}:{user.get('password') or ''}"
        auth.basic = base64.b64encode(pair.encode()).decode()
    cert = _file_or_data(user, "client-certificate", where, base)
    key = _file_or_data(user, "client-key", where, base)
    if (cert is None) != (key is None):
        raise KubeconfigError(f"{where}: client-certificate and client-key go together")
    auth.cert_pem, auth.key_pem = cert, key
    plugin = user.get("exec")
    if plugin:
        if not isinstance(plugin, Mapping) or not plugin.get("command"):
            raise KubeconfigError(f"{where}.exec.command: required")
        env = {str(e.get("name")): str(e.get("value", "")) for e in plugin.get("env") or []
               if isinstance(e, Mapping)}
        auth.plugin = ExecPlugin(
            command=str(plugin["command"]), args=[str(a) for a in plugin.get("args") or []],
            env=env, api_version=str(plugin.get("apiVersion")
                                     or "client.authentication.k8s.io/v1"),
            where=f"{where}.exec")
    return auth


def _client(cluster: Mapping[str, Any], where: str, base: Path, auth: Auth,
            uwhere: str) -> ApiClient:
    if cluster.get("proxy-url"):
        raise KubeconfigError(f"{where}.proxy-url: not supported")
    server = cluster.get("server")
    if not server:
        raise KubeconfigError(f"{where}.server: required")
    ca = _file_or_data(cluster, "certificate-authority", where, base)
    try:
        client = ApiClient(str(server), auth,
                           ca_data=ca.decode() if ca is not None else None,
                           insecure=bool(cluster.get("insecure-skip-tls-verify")),
                           server_name=cluster.get("tls-server-name") or None)
    except KubeconfigError as exc:
        raise KubeconfigError(f"{where}.{exc}") from None
    if auth.cert_pem is not None and auth.key_pem is not None and client.scheme == "https":
        try:
            client.ssl_context((auth.cert_pem, auth.key_pem))
        except KubeconfigError as exc:
            raise KubeconfigError(f"{uwhere}.{exc}") from None
    return client
