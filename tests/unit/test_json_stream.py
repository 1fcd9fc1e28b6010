"""JSON Lists read item by item (yamlio.JsonObject, the manifest source's
fast path): the same objects as json.loads, the same refusals, the whole-text
path where streaming cannot know (kind after the items, not a List), and a
peak that follows the objects kept rather than the parse tree."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from factories import endpoint, service, slice_
from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.bus import Event
from svcproxy.sources.manifests import ManifestSource
from svcproxy.yamlio import JsonObject

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=12)


def assembled(text: str) -> dict[str, Any]:
    """The object as JsonObject reads it, put back together."""
    doc = JsonObject(text)
    items = list(doc.items())
    out = dict(doc.head)
    if doc.streamed and "items" not in out:
        out["items"] = items
    return out


@given(head=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       items=st.lists(json_values, max_size=5) | st.none(), indent=st.sampled_from([None, 1]))
@settings(max_examples=300, deadline=None)
def test_same_values_as_json_loads(head: dict[str, Any], items: list[Any] | None,
                                   indent: int | None) -> None:
    obj = dict(head)
    if items is not None:
        obj["items"] = items
    text = json.dumps(obj, indent=indent)
    assert assembled(text) == json.loads(text)


@given(st.text(alphabet='{}[]":,0123456789 \n"aitems', max_size=40))
@settings(max_examples=500, deadline=None)
def test_refuses_what_json_loads_refuses(text: str) -> None:
    try:
        want: Any = json.loads(text)
    except ValueError:
        want = ValueError
    if not JsonObject.holds_object(text):
        return
    try:
        got: Any = assembled(text)
    except ValueError:
        got = ValueError
    assert got == want, text


def src_of(tmp_path: Path) -> ManifestSource:
    return ManifestSource(tmp_path, publish=lambda e: None, clock=lambda: time.time() + 60)


def names(events: list[Event]) -> list[str]:
    return [str(e) for e in events]


def test_kubectl_order_typed_lists_and_lookalikes(tmp_path: Path) -> None:
    svc_b = {k: v for k, v in service("b", cluster_ip="10.96.0.11").items() if k != "kind"}
    # kubectl's key order: kind after items (each item says its kind)
    (tmp_path / "a.json").write_text(json.dumps(
        {"apiVersion": "v1", "items": [service("a"), slice_("a", endpoints=[
            endpoint("10.0.0.1")])], "kind": "List", "metadata": {}}))
    # the API server's: kind first, items without one
    (tmp_path / "b.json").write_text(json.dumps(
        {"kind": "ServiceList", "apiVersion": "v1", "items": [svc_b]}))
    # items without a kind before the kind is known: the whole-text path
    (tmp_path / "c.json").write_text(json.dumps(
        {"items": [{k: v for k, v in service("c", cluster_ip="10.96.0.12").items()
                    if k != "kind"}], "kind": "ServiceList"}))
    # an object that has items but is no List: its items are not objects
    lookalike = service("d", cluster_ip="10.96.0.13")
    (tmp_path / "d.json").write_text(json.dumps(
        {"items": [service("e", cluster_ip="10.96.0.14")], **lookalike}))
    # a repeated items key: the last one counts, as json.loads has it
    first = json.dumps(service("x", cluster_ip="10.96.0.15"))
    last = json.dumps(service("f", cluster_ip="10.96.0.16"))
    (tmp_path / "f.json").write_text(
        f'{{"apiVersion": "v1", "kind": "List", "items": [{first}], "items": [{last}]}}')
    src = src_of(tmp_path)
    assert sorted(names(src.scan())) == [
        "ADDED EndpointSlice default/a-abc", "ADDED Service default/a",
        "ADDED Service default/b", "ADDED Service default/c", "ADDED Service default/d",
        "ADDED Service default/f"]
    assert src.errors == []


def test_a_bad_item_is_reported_with_its_line(tmp_path: Path) -> None:
    bad = service("b", cluster_ip="10.96.0.11")
    bad["spec"]["ports"][0]["port"] = 70000
    (tmp_path / "a.json").write_text(json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [service("a"), bad]}, indent=2))
    src = src_of(tmp_path)
    assert names(src.scan()) == ["ADDED Service default/a"]
    [error] = src.errors
    assert "70000" in str(error) and error.line is not None and error.line > 10, error
    (tmp_path / "a.json").write_text('{"apiVersion": "v1", "kind": "List", "items": [}')
    src.scan()
    [error] = src.errors
    assert error.path.endswith("a.json") and error.line == 1, error


def test_peak_follows_the_objects_not_the_tree(tmp_path: Path) -> None:
    objs: list[dict[str, Any]] = []
    for i in range(2000):
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        objs.append(service(f"s{i}", cluster_ip=ip))
        objs.append(slice_(f"s{i}", endpoints=[endpoint(f"10.1.{i // 250}.{i % 250 + j}")
                                               for j in range(5)]))
    text = json.dumps({"apiVersion": "v1", "items": objs, "kind": "List"})
    (tmp_path / "all.json").write_text(text)
    del objs
    tracemalloc.start()
    try:
        tree = json.loads(text)
        _, whole = tracemalloc.get_traced_memory()
        del tree
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        src = src_of(tmp_path)
        assert len(src.scan()) == 4000
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the file's text is read either way; the tree on top of it is not built
    text_size = len(text)
    assert peak - base - 2 * text_size < (whole - text_size) / 2, (peak, base, whole)
    assert peak - kept < 2.5 * text_size, (peak, kept)


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "[{\"kind\": \"Service\"}]"])
def test_not_an_object_goes_the_whole_way(tmp_path: Path, text: str) -> None:
    (tmp_path / "a.json").write_text(text)
    src = src_of(tmp_path)
    assert src.scan() == []
    assert len(src.errors) == (0 if text == "null" else 1)  # (not a mapping)
