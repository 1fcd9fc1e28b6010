"""The manifest-directory source: change events, bad files, lists."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import pytest
import yaml
from factories import endpoint, service, slice_

from svcproxy.bus import Event
from svcproxy.errors import ManifestError
from svcproxy.sources.manifests import ManifestSource


def write(path: Path, *docs: dict) -> None:  # type: ignore[type-arg]
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))


def events(src: ManifestSource) -> list[str]:
    return [str(e) for e in src.scan()]


@pytest.fixture
def src(tmp_path: Path) -> ManifestSource:
    got: list[Event] = []
    s = ManifestSource(tmp_path, publish=got.append)
    s.published = got  # type: ignore[attr-defined]
    return s


def test_added_modified_deleted(tmp_path: Path, src: ManifestSource) -> None:
    write(tmp_path / "a.yaml", service("a"), slice_("a", endpoints=[endpoint("10.0.0.1")]))
    write(tmp_path / "b.yml", service("b", cluster_ip="10.96.0.11"))
    assert events(src) == ["ADDED Service default/a", "ADDED Service default/b",
                           "ADDED EndpointSlice default/a-abc"]
    assert events(src) == []  # nothing changed
    write(tmp_path / "a.yaml", service("a"), slice_("a", endpoints=[endpoint("10.0.0.2")]))
    assert events(src) == ["MODIFIED EndpointSlice default/a-abc"]
    (tmp_path / "b.yml").unlink()
    assert events(src) == ["DELETED Service default/b"]
    write(tmp_path / "a.yaml", service("a"))
    assert events(src) == ["DELETED EndpointSlice default/a-abc"]
    assert len(src.published) == 6  # type: ignore[attr-defined]


def test_resource_version_only_change_is_no_event(tmp_path: Path, src: ManifestSource) -> None:
    svc = service("a")
    write(tmp_path / "a.yaml", svc)
    events(src)
    svc["metadata"]["resourceVersion"] = "42"
    write(tmp_path / "a.yaml", svc)
    assert events(src) == []


def test_kubectl_list_and_json(tmp_path: Path, src: ManifestSource) -> None:
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "List", "items": [service("a"), {"kind": "Pod",
                                                                     "metadata": {"name": "p"}}],
        "metadata": {"resourceVersion": ""}}))
    typed = {"apiVersion": "v1", "kind": "ServiceList",
             "items": [{k: v for k, v in service("b", cluster_ip="10.96.0.11").items()
                        if k != "kind"}]}
    import json
    (tmp_path / "b.json").write_text(json.dumps(typed))
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert events(src) == ["ADDED Service default/a", "ADDED Service default/b"]
    assert src.errors == []


def test_broken_yaml_is_reported_with_line_and_last_good_content_kept(
        tmp_path: Path, src: ManifestSource, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", service("a"))
    write(tmp_path / "b.yaml", service("b", cluster_ip="10.96.0.11"))
    events(src)
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a\n")
    write(tmp_path / "b.yaml", service("b", cluster_ip="10.96.0.12"))
    assert events(src) == ["MODIFIED Service default/b"]  # a.yaml's Service stays
    (err,) = src.errors
    assert err.path.endswith("a.yaml") and err.line is not None
    assert f"{tmp_path / 'a.yaml'}:" in caplog.text and "invalid YAML" in caplog.text


def test_bad_object_is_skipped_with_file_and_line(tmp_path: Path, src: ManifestSource) -> None:
    (tmp_path / "svc.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: good}
        spec:
          clusterIP: 10.96.0.1
          ports: [{port: 80}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: bad}
        spec:
          clusterIP: 10.96.0.2
          ports:
            - name: http
              port: 99999
    """))
    assert events(src) == ["ADDED Service default/good"]
    (err,) = src.errors
    assert str(err) == (f"{tmp_path / 'svc.yaml'}:15: Service default/bad: spec.ports[0].port: "
                        "must be between 1 and 65535 (got 99999)")


def test_an_object_that_turns_bad_keeps_its_last_good_version(tmp_path: Path,
                                                                src: ManifestSource) -> None:
    write(tmp_path / "a.yaml", service("a"))
    events(src)
    bad = service("a")
    bad["spec"]["ports"][0]["port"] = 0
    write(tmp_path / "a.yaml", bad)
    assert events(src) == [] and len(src.errors) == 1
    write(tmp_path / "a.yaml")  # emptied for real: now it goes
    assert events(src) == ["DELETED Service default/a"] and src.errors == []


def test_duplicates_first_file_wins(tmp_path: Path, src: ManifestSource) -> None:
    write(tmp_path / "1.yaml", service("a"))
    write(tmp_path / "2.yaml", service("a", cluster_ip="10.96.9.9"))
    (e,) = src.scan()
    assert e.object.cluster_ips == ("10.96.0.10",)  # type: ignore[union-attr]


def test_missing_directory() -> None:
    with pytest.raises(ManifestError, match="not a directory"):
        ManifestSource("/nonexistent/dir", publish=lambda e: None).check_directory()


def test_watch_picks_up_changes(tmp_path: Path) -> None:
    got: list[str] = []
    seen = threading.Event()

    def publish(e: Event) -> None:
        got.append(str(e))
        seen.set()

    s = ManifestSource(tmp_path, publish=publish, poll_interval=0.05)
    s.scan()
    stop = threading.Event()
    t = threading.Thread(target=s.watch, args=(stop,))
    t.start()
    try:
        write(tmp_path / "a.yaml", service("a"))
        assert seen.wait(5)
    finally:
        stop.set()
        t.join()
    assert got == ["ADDED Service default/a"]


def test_kinds_a_plugin_asked_for_are_read_too(tmp_path: Path) -> None:
    """svcproxy_watch_kinds: the manifest source reads a plugin's kind (here the
    metallb plugin's IPAddressPool) besides its own; without the ask, it is
    ignored like any other kind."""
    from svcproxy.plugins.metallb.pools import POOLS

    pool = {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": {"name": "p", "namespace": "metallb-system"},
            "spec": {"addresses": ["203.0.113.0/24"]}}
    write(tmp_path / "pool.yaml", pool, service("a"))
    plain = ManifestSource(tmp_path, publish=lambda e: None)
    assert events(plain) == ["ADDED Service default/a"]
    asked = ManifestSource(tmp_path, publish=lambda e: None, extra_kinds=[POOLS])
    assert events(asked) == ["ADDED Service default/a", "ADDED IPAddressPool metallb-system/p"]
