"""The Kubernetes API source: list+watch of Services, EndpointSlices and this
node's Node object, as kube-proxy's informers do, over svcproxy's own small
API client (sources/kubeclient.py).

Per resource a reflector thread lists (in pages), publishes what changed
against what it holds, then watches from the list's resourceVersion with
bookmarks. A watch that ends is resumed from the last resourceVersion seen; a
410 Gone (expired resourceVersion) relists, which publishes DELETED for
objects that vanished meanwhile and MODIFIED only for objects whose content
changed. Errors back off exponentially with jitter (honouring Retry-After);
every `configSyncPeriod` the reflector relists to repair anything missed.

Objects are read as raw JSON and parsed by svcproxy's own model, so events
reach the bus exactly as the manifest source's do.
"""

from __future__ import annotations

import datetime
import http.client
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..bus import Event, EventType
from ..datapath import WatchedKind
from ..errors import ObjectError, show
from ..gcpause import gc_paused
from ..hookspecs import hookimpl
from ..model import (
    ClusterObject,
    WatchedObject,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from .kubeclient import ApiClient, ApiError, Session, event_path

log = logging.getLogger(__name__)

#: kube-proxy's informer selector: skip Services owned by another proxy and
#: headless ones (the EndpointSlice controller labels their slices)
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
PAGE_SIZE = 500


class Gone(Exception):
    """The resourceVersion we asked for has expired: relist."""


class RetryLater(Exception):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


def connection_error(exc: BaseException) -> str:
    """What went wrong reaching the server, the same text for every retry of
    one fault: the error, without object addresses."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-f]+>:? ?", "", str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Backoff:
    """Jittered exponential backoff: 0.8 s, 1.6 s, ... up to `cap`."""

    base: float = 0.8
    cap: float = 30.0
    attempts: int = 0

    def next(self, hint: float | None = None) -> float:
        self.attempts += 1
        delay = min(self.cap, self.base * 2 ** (self.attempts - 1))
        delay *= random.uniform(0.5, 1.5)
        return float(max(delay, hint or 0.0))

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class Resource:
    name: str  # for logs and the bus's sync tracking: "services", "endpointslices", "nodes"
    path: str  # the list's URL path: /api/v1/services
    parse: Callable[[Any], Any]  # a ClusterObject, or a plugin's WatchedObject
    kind: str
    api_version: str
    selector: dict[str, str]  # query parameters: labelSelector, fieldSelector


class Reflector:
    """List+watch of one resource, publishing parsed events."""

    def __init__(self, resource: Resource, publish: Callable[[Event], object],
                 on_synced: Callable[[str], None], stop: threading.Event,
                 resync_period: float, watch_timeout: tuple[int, int] = (240, 480),
                 request_timeout: float = 30.0, backoff_cap: float = 30.0,
                 on_error: Callable[[str, str], object] | None = None,
                 client: ApiClient | None = None) -> None:
        self.r = resource
        self.publish = publish
        self.on_synced = on_synced
        self.stop = stop
        self.resync_period = resync_period
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.store: dict[str, ClusterObject | WatchedObject] = {}
        self.resource_version = ""
        self.synced = False
        self.backoff = Backoff(cap=backoff_cap)
        #: called with (resource, message) on every failed request
        self.on_error = on_error
        #: the current run of failed requests: how many, since when, and the
        #: message last logged (a fault is logged once, not on every retry)
        self.failed = 0
        self.failing_since = 0.0
        self._logged = ""
        self.session = Session(client) if client is not None else None
        self.lists = 0  # how many full lists ran (tests watch relists)

    # -- HTTP ------------------------------------------------------------------------

    def _call(self, query: dict[str, Any], timeout: tuple[float, float],
              whole: bool = True) -> Any:
        """One GET of the resource: the body (bytes) when `whole`, else the
        streamed response. Failures raise Gone or RetryLater."""
        if self.session is None:
            raise RetryLater(f"{self.r.name}: no API client")
        try:
            resp = self.session.request("GET", self.r.path, {**self.r.selector, **query},
                                        timeout=timeout)
            out = self.session.finish(resp) if whole else resp
        except ApiError as exc:
            if exc.status == 410:
                raise Gone(exc.message or exc.reason) from None
            if exc.status == 404:
                # a custom resource whose CRD is not installed (yet): look again later
                raise RetryLater(f"{self.r.name}: not served by the API server (is its "
                                 "CRD installed?)", 300.0) from None
            retry = None
            if exc.headers.get("retry-after"):
                try:
                    retry = float(exc.headers["retry-after"])
                except ValueError:
                    retry = None
            raise RetryLater(f"{self.r.name}: the API server answered {exc.status} "
                             f"{exc.reason}", retry) from None
        except (http.client.HTTPException, OSError) as exc:
            raise RetryLater(f"{self.r.name}: cannot reach the API server: "
                             f"{connection_error(exc)}") from None
        self._recovered()
        return out

    # -- list ------------------------------------------------------------------------

    def relist(self) -> None:
        with gc_paused():  # (svcproxy.gcpause)
            self._relist()

    def _relist(self) -> None:
        # each page is parsed as it arrives and its raw JSON dropped: the raw
        # objects of a whole list are ~10x the model's (the peak at 10,000
        # Services was the list, not the proxy)
        fresh: dict[str, ClusterObject | WatchedObject] = {}
        cont = None
        rv = ""
        while True:
            query: dict[str, Any] = {"limit": PAGE_SIZE}
            if cont:
                query["continue"] = cont
            data = self._call(query, (self.request_timeout, self.request_timeout))
            try:
                body = json.loads(data)
            except ValueError as exc:
                raise RetryLater(f"list of {self.r.name}: invalid JSON: {exc}") from None
            del data
            if not isinstance(body, dict):
                raise RetryLater(f"list of {self.r.name}: not a list: {show(body)[:200]}")
            for raw in body.get("items") or []:
                obj = self._parse(raw)
                if obj is not None:
                    fresh[obj.key] = obj
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion", rv)
            cont = meta.get("continue")
            del body
            if not cont:
                break
        self.lists += 1
        for key, obj in fresh.items():
            old = self.store.get(key)
            if old is None:
                self.publish(Event(EventType.ADDED, obj, "kubernetes"))
            elif old != obj:
                self.publish(Event(EventType.MODIFIED, obj, "kubernetes"))
        for key in [k for k in self.store if k not in fresh]:
            self.publish(Event(EventType.DELETED, self.store[key], "kubernetes"))
        self.store = fresh
        self.resource_version = rv
        if not self.synced:
            self.synced = True
            log.info("initial list of %s: %d objects (resourceVersion %s)", self.r.name,
                     len(fresh), rv)
            self.on_synced(self.r.name)

    def _parse(self, raw: Any) -> ClusterObject | WatchedObject | None:
        if isinstance(raw, dict):
            raw.setdefault("kind", self.r.kind)
            raw.setdefault("apiVersion", self.r.api_version)
        try:
            obj: ClusterObject | WatchedObject = self.r.parse(raw)
        except ObjectError as exc:
            log.warning("ignoring a malformed %s from the API server: %s", self.r.kind, exc)
            return None
        return obj

    # -- watch -----------------------------------------------------------------------

    def watch(self, until: float) -> None:
        """Watch from resource_version until the server ends the stream, `until`
        passes (resync), or stop is set."""
        timeout = random.randint(*self.watch_timeout)
        timeout = max(1, min(timeout, int(until - time.monotonic()) + 1))
        resp = self._call({"watch": True, "resourceVersion": self.resource_version,
                           "allowWatchBookmarks": True, "timeoutSeconds": timeout},
                          (self.request_timeout, timeout + 30), whole=False)
        assert self.session is not None
        try:
            for line in self.session.lines(resp):
                if self.stop.is_set():
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("watch of %s: skipping an unreadable event", self.r.name)
                    continue
                self._handle(event)
                self.backoff.reset()
                if time.monotonic() >= until:
                    return
        except (Gone, RetryLater):
            raise
        except (http.client.HTTPException, OSError, ValueError) as exc:
            if self.stop.is_set():
                return
            raise RetryLater(f"watch of {self.r.name} broke: {connection_error(exc)}") \
                from None
        finally:
            # a stream left before its end cannot carry the next request
            self.session.release()

    def _handle(self, event: Any) -> None:
        raw = event.get("object") if isinstance(event, Mapping) else None
        if not isinstance(raw, Mapping):
            log.warning("watch of %s: skipping an event that is not {type, object} "
                        "(got %s)", self.r.name, show(event))
            return
        etype = event.get("type")
        if etype == "ERROR":
            code = raw.get("code")
            if code == 410:
                raise Gone(str(raw.get("message", "resource version expired")))
            raise RetryLater(f"watch of {self.r.name}: {raw.get('message') or raw}")
        meta = raw.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if rv is not None and not isinstance(rv, str):
            rv = None
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        obj = self._parse(raw)
        if rv:
            self.resource_version = rv
        if obj is None:
            return
        if etype == "DELETED":
            if self.store.pop(obj.key, None) is not None:
                self.publish(Event(EventType.DELETED, obj, "kubernetes"))
        elif etype in ("ADDED", "MODIFIED"):
            old = self.store.get(obj.key)
            self.store[obj.key] = obj
            if old is None:
                self.publish(Event(EventType.ADDED, obj, "kubernetes"))
            elif old != obj:
                self.publish(Event(EventType.MODIFIED, obj, "kubernetes"))

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        need_list = True
        next_resync = time.monotonic() + self.resync_period
        while not self.stop.is_set():
            try:
                if need_list or time.monotonic() >= next_resync:
                    self.relist()
                    need_list = False
                    next_resync = time.monotonic() + self.resync_period
                    self.backoff.reset()
                self.watch(next_resync)
            except Gone as exc:
                log.info("watch of %s: %s; relisting", self.r.name, exc)
                need_list = True
            except RetryLater as exc:
                delay = self.backoff.next(exc.delay)
                self._failure(str(exc), delay)
                self.stop.wait(delay)
            except Exception as exc:
                delay = self.backoff.next()
                log.exception("%s reflector failed; retrying in %.1fs", self.r.name, delay)
                self._failure(f"{type(exc).__name__}: {exc}", delay, logged=True)
                self.stop.wait(delay)

    def _failure(self, message: str, delay: float, logged: bool = False) -> None:
        """A failed request: counted every time, logged when the fault is new
        (the first failure, or a different message), the retries at debug."""
        if not self.failed:
            self.failing_since = time.monotonic()
        self.failed += 1
        if self.on_error is not None:
            self.on_error(self.r.name, message)
        if logged:
            self._logged = message
        elif message != self._logged:
            self._logged = message
            log.warning("%s; serving what was read before, retrying in %.1fs with backoff "
                        "up to %.0fs (retries logged at debug level)", message, delay,
                        self.backoff.cap)
        else:
            log.debug("%s; retrying in %.1fs (attempt %d)", message, delay, self.failed)

    def _recovered(self) -> None:
        """A request succeeded: end the current run of failures, saying so once."""
        if self.failed:
            log.warning("%s: the API server answers again after %d failed attempt%s over "
                        "%.0fs", self.r.name, self.failed, "" if self.failed == 1 else "s",
                        time.monotonic() - self.failing_since)
            self.failed = 0
            self._logged = ""

    def interrupt(self) -> None:
        """End a blocked read (stop): the reader sees stop set and exits quietly."""
        if self.session is not None:
            self.session.shutdown()


class KubernetesSource:
    """The three reflectors, plus the operator-facing Node events. Also a
    plugin: it posts a Warning Event on the Node when the datapath fell back."""

    name = "kubernetes"

    def __init__(self, api_client: ApiClient, node_name: str, publish: Callable[[Event], object],
                 on_synced: Callable[[str], None], resync_period: float = 900.0,
                 watch_timeout: tuple[int, int] = (240, 480),
                 extra_kinds: Sequence[WatchedKind] = (),
                 on_error: Callable[[str, str], object] | None = None,
                 backoff_cap: float = 30.0) -> None:
        self.api_client = api_client
        self.node_name = node_name
        self.stop_event = threading.Event()
        resources = [
            Resource("services", "/api/v1/services", parse_service, "Service", "v1",
                     {"labelSelector": PROXY_SELECTOR}),
            Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices",
                     parse_endpoint_slice, "EndpointSlice", "discovery.k8s.io/v1",
                     {"labelSelector": PROXY_SELECTOR}),
            Resource("nodes", "/api/v1/nodes", parse_node, "Node", "v1",
                     {"fieldSelector": f"metadata.name={node_name}"}),
        ]
        # kinds plugins asked for (svcproxy_watch_kinds): not needed for the first
        # sync (not in REQUIRED)
        for extra in extra_kinds:
            resources.append(Resource(
                extra.plural, f"/apis/{extra.group}/{extra.version}/{extra.plural}",
                extra.parse, extra.kind, extra.api_version, {}))
        self.reflectors = [Reflector(r, publish, on_synced, self.stop_event, resync_period,
                                     watch_timeout, backoff_cap=backoff_cap, on_error=on_error,
                                     client=api_client)
                           for r in resources]
        self.threads: list[threading.Thread] = []

    #: sources whose initial list gates the first sync (kube-proxy waits for the
    #: Service and EndpointSlice caches, not for the Node)
    REQUIRED = ("services", "endpointslices")

    def start(self) -> None:
        for r in self.reflectors:
            t = threading.Thread(target=r.run, name=f"reflector-{r.r.name}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self.stop_event.set()
        for r in self.reflectors:
            r.interrupt()
        for t in self.threads:
            t.join(timeout=10)

    # -- operator events ---------------------------------------------------------------

    @hookimpl
    def svcproxy_start_proxy(self, datapath: str, skipped: list[tuple[str, str]]) -> None:
        for name, reason in skipped:
            self.post_node_event("DatapathFallback",
                                 f"{name} datapath unusable: {reason}; using {datapath}")

    @hookimpl
    def svcproxy_report_object(self, kind: str, namespace: str, name: str, reason: str,
                               message: str) -> None:
        self.post_event(kind, namespace, name, reason, message)

    def post_node_event(self, reason: str, message: str, type_: str = "Warning") -> None:
        self.post_event("Node", "", self.node_name, reason, message, type_)

    def post_event(self, kind: str, namespace: str, name: str, reason: str, message: str,
                   type_: str = "Warning") -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event_ns = namespace or "default"
        involved: dict[str, str] = {"kind": kind, "name": name, "apiVersion": "v1"}
        if namespace:
            involved["namespace"] = namespace
        if kind == "Node":
            involved["uid"] = name  # as the kubelet's Node events
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.svcproxy-", "namespace": event_ns},
            "involvedObject": involved, "reason": reason, "message": message,
            "type": type_, "count": 1, "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": "svcproxy", "host": self.node_name},
            "reportingComponent": "svcproxy", "reportingInstance": socket.gethostname(),
        }
        session = Session(self.api_client)
        try:
            resp = session.request("POST", event_path(event_ns), body=body,
                                   timeout=(10.0, 10.0))
            session.finish(resp)
        except (ApiError, http.client.HTTPException, OSError) as exc:
            # an event is best effort; the log already says it
            log.warning("could not post the %s event on %s %s: %s", reason, kind, name, exc)
        finally:
            session.close()
