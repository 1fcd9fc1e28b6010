"""Property-based fuzzing of everything svcproxy reads from outside: configs,
manifests (objects and whole files) and API watch events. Whatever the shape,
there is never a traceback (only svcproxy's own errors), a bad object never
stops the valid ones from being planned, and the error names the object (or
file) and the field."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import yaml
from factories import endpoint, node, plan_of, service, slice_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svcproxy.bus import Event
from svcproxy.config import parse_config
from svcproxy.errors import ConfigError, ObjectError
from svcproxy.model import parse_object
from svcproxy.sources.manifests import ManifestSource

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)

VALID = [
    node("node-a", ips=["192.168.1.10"]),
    service("web", cluster_ip="10.96.0.10", type="LoadBalancer",
            ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                    "nodePort": 30080}],
            externalIPs=["192.0.2.10"], sessionAffinity="ClientIP",
            loadBalancerSourceRanges=["198.51.100.0/24"], externalTrafficPolicy="Local",
            healthCheckNodePort=32000,
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}),
    slice_("web", endpoints=[endpoint("10.244.1.11", "node-a"),
                             endpoint("10.244.2.12", "node-b")]),
]


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], Any]:
    """A valid object with one field (anywhere) replaced by any JSON value."""
    original = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(paths(original)))
    return original, replaced(original, path, draw(JSON))


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_a_mutated_object_parses_or_is_refused_naming_object_and_field(
        case: tuple[dict[str, Any], Any]) -> None:
    original, obj = case
    try:
        parsed = parse_object(obj) if isinstance(obj, dict) else parse_object({"kind": obj})
    except ObjectError as exc:
        text = str(exc)
        assert exc.field or exc.name == "<unknown>", text
        if exc.name != "<unknown>":
            assert original["metadata"]["name"] in text or "metadata" in exc.field, text
        return
    # a parsed object is planned like any other, next to the valid ones
    others = [o for o in VALID if o is not original]
    plan_of([*others, obj] if parsed is not None else others)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      JSON.map(json.dumps), JSON.map(yaml.safe_dump), mutated().map(
                          lambda c: yaml.safe_dump(c[1]))))
def test_a_bad_manifest_file_never_hides_the_good_ones(tmp_path: Path, junk: str) -> None:
    directory = tmp_path / "m"
    directory.mkdir(exist_ok=True)
    for f in directory.iterdir():
        f.unlink()
    (directory / "00-good.yaml").write_text(yaml.safe_dump_all(VALID))
    (directory / "50-junk.yaml").write_text(junk)
    events: list[Event] = []
    source = ManifestSource(directory, publish=events.append)
    source.scan()
    served = {(type(o).__name__, o.name) for o in source.objects.values()}
    # the good file's objects are served whatever the other file holds (the
    # first definition of an object wins, and the good file sorts first)
    assert {("Node", "node-a"), ("Service", "web"), ("EndpointSlice", "web-abc")} <= served
    for error in source.errors:
        assert "50-junk.yaml" in str(error), error


SECTIONS = yaml.safe_load("""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
clusterCIDR: 10.244.0.0/16
nodePortAddresses: [primary]
healthzBindAddress: 0.0.0.0:10256
featureGates: {PreferSameTrafficDistribution: true}
ipvs: {scheduler: rr, strictARP: true, excludeCIDRs: [10.0.0.0/8], syncPeriod: 30s}
iptables: {masqueradeBit: 14, localhostNodePorts: true, minSyncPeriod: 1s}
conntrack: {maxPerCore: 32768, tcpEstablishedTimeout: 24h}
detectLocal: {bridgeInterface: cbr0}
logging: {format: text, verbosity: 2}
""")
SVC = yaml.safe_load("""\
apiVersion: svcproxy.io/v1alpha1
kind: SvcProxyConfiguration
enable: [{name: conntrack, options: {warnAt: 0.9}}]
disable: [metallb]
datapaths: [ipvs, iptables]
datapathOptions: {iptables: {backend: auto}}
fullSyncPeriod: 10m
""")


@st.composite
def configs(draw: st.DrawFn) -> str:
    kp = SECTIONS
    sp = SVC
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.booleans())
        doc = kp if which else sp
        path = draw(st.sampled_from(paths(doc)[1:]))
        value = draw(JSON | st.text(max_size=20))
        if which:
            kp = replaced(kp, path, value)
        else:
            sp = replaced(sp, path, value)
    return yaml.safe_dump(kp) + "---\n" + yaml.safe_dump(sp)


@settings(max_examples=300, deadline=None)
@given(configs())
def test_any_config_loads_or_is_refused_naming_file_and_field(text: str) -> None:
    from svcproxy.errors import PluginError
    from svcproxy.manager import PluginHost

    try:
        config = parse_config(text, "fuzz.yaml")
        PluginHost(config).configure()
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml"), str(exc)
        assert exc.problems and all(p.path or p.message for p in exc.problems)
    except PluginError as exc:  # a plugin name that is no plugin
        assert "plugin" in str(exc)


@st.composite
def events(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]))
    obj = draw(st.one_of(JSON, mutated().map(lambda c: c[1])))
    return draw(st.sampled_from([{"type": kind, "object": obj}, obj, {"type": kind}]))


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), max_size=4))
def test_watch_events_of_any_shape_never_stop_the_valid_ones(junk: list[Any]) -> None:
    import threading

    from svcproxy.sources.kubernetes import Gone, Reflector, Resource, RetryLater

    published: list[Event] = []
    resource = Resource("services", "/api/v1/services", parse_object, "Service", "v1", {})
    reflector = Reflector(resource, published.append, lambda name: None, threading.Event(),
                          resync_period=900)
    for event in junk:
        # an ERROR event ends the watch (Gone relists, RetryLater backs off)
        with contextlib.suppress(Gone, RetryLater):
            reflector._handle(event)
    good = copy.deepcopy(VALID[1])
    good["metadata"]["name"] = "after-the-junk"
    reflector._handle({"type": "ADDED", "object": good})
    assert published and published[-1].object.name == "after-the-junk"


ENDPOINT_VALUES = st.one_of(
    JSON, st.sampled_from(["10.0.0.1", "10.0.0.01", "010.0.0.1", "1.2.3.4 ", "fd00::1",
                           "::ffff:1.2.3.4", "1.2.3", "255.255.255.255", "a\x00b", ""]),
    st.lists(st.sampled_from(["10.0.0.1", "10.1.2.3", "1.2.3.04", "::1", 7]), max_size=3))


@st.composite
def endpoints(draw: st.DrawFn) -> Any:
    """An endpoint with each field present or not, of the right type or any."""
    ep: dict[str, Any] = {}
    for key, good in (("addresses", st.lists(st.sampled_from(["10.0.0.1", "10.9.8.7"]),
                                             max_size=3)),
                      ("conditions", st.fixed_dictionaries({}, optional={
                          k: st.none() | st.booleans() | JSON
                          for k in ("ready", "serving", "terminating")})),
                      ("nodeName", st.text(max_size=5)), ("zone", st.text(max_size=5)),
                      ("hints", st.just({"forZones": [{"name": "z"}]}))):
        if draw(st.booleans()):
            ep[key] = draw(good if draw(st.booleans()) else ENDPOINT_VALUES)
    return ep if draw(st.integers(0, 9)) else draw(JSON)


@settings(max_examples=500, deadline=None)
@given(endpoints())
def test_the_fast_endpoint_reader_agrees_with_the_checking_one(ep: Any) -> None:
    """model._plain_endpoint reads nearly every IPv4 endpoint without field
    paths; whenever it answers, the answer is the checking reader's (which
    also refuses, naming the field, what the fast one passes on)."""
    from svcproxy import model

    obj = slice_("web", endpoints=[])
    obj["endpoints"] = [ep]
    fast = model._plain_endpoint(ep)
    original = model._plain_endpoint
    model._plain_endpoint = lambda _ep: None  # type: ignore[assignment]
    try:
        checked: Any = model.parse_endpoint_slice(obj).endpoints[0]
    except ObjectError as exc:
        checked = exc
    finally:
        model._plain_endpoint = original
    if fast is not None:
        assert fast == checked
