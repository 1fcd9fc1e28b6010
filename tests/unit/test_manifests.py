"""The manifest-directory source: change events, bad files, lists."""

from __future__ import annotations

import textwrap
import threading
import time
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
    # every file looks written long ago: used at once (the half-written-file
    # rules have their own tests below)
    s = ManifestSource(tmp_path, publish=got.append, clock=lambda: time.time() + 60)
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
    assert events(src) == []  # gone at one scan: maybe being replaced (rm, then cp)
    assert events(src) == ["DELETED Service default/b"]  # still gone at the next
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


class Clock:
    """The manifest source's wall clock, moved by the test (file mtimes are
    real: the clock is set relative to them)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_file_caught_half_written_is_used_only_once_it_stops_changing(
        tmp_path: Path) -> None:
    """A file rewritten in place moments ago (same inode, mtime within a poll
    interval) may be caught half-written: here truncated at a document
    boundary, which is valid YAML that lacks the slice. It is used when a later
    scan finds the same content (or once it is older than a poll interval);
    the complete file replaces it first if the writer finishes meanwhile."""
    clock = Clock()
    got: list[tuple[str, str]] = []
    s = ManifestSource(tmp_path, publish=lambda e: None, clock=clock,
                       on_error=lambda r, m: got.append((r, m)))
    path = tmp_path / "a.yaml"
    write(path, service("a"), slice_("a", endpoints=[endpoint("10.0.0.1")]))
    assert events(s) == ["ADDED Service default/a", "ADDED EndpointSlice default/a-abc"]
    inode = path.stat().st_ino
    write(path, service("a"))  # the writer got as far as the first document
    assert path.stat().st_ino == inode
    clock.now = time.time() + 0.2
    assert events(s) == []  # not used yet: the slice stays
    write(path, service("a"), slice_("a", endpoints=[endpoint("10.0.0.2")]))  # done
    clock.now = time.time() + 0.2
    assert events(s) == []  # changed again since the last scan: not yet
    assert events(s) == ["MODIFIED EndpointSlice default/a-abc"]  # the same twice: used
    # a file last written longer than a poll interval ago is used at once
    write(path, service("a"))
    clock.now = time.time() + 5
    assert events(s) == ["DELETED EndpointSlice default/a-abc"]
    assert got == []


def test_a_file_replaced_by_rename_is_used_at_once(tmp_path: Path) -> None:
    """Written elsewhere and renamed over the old file (a new inode): complete
    by construction, used at the first scan that sees it."""
    clock = Clock()
    s = ManifestSource(tmp_path, publish=lambda e: None, clock=clock)
    write(tmp_path / "a.yaml", service("a"), slice_("a", endpoints=[endpoint("10.0.0.1")]))
    events(s)
    write(tmp_path / ".a.yaml.tmp", service("a"), slice_("a", endpoints=[endpoint("10.0.0.2")]))
    (tmp_path / ".a.yaml.tmp").rename(tmp_path / "a.yaml")
    clock.now = time.time()
    assert events(s) == ["MODIFIED EndpointSlice default/a-abc"]


def test_a_configmap_volume_swapped_atomically(tmp_path: Path) -> None:
    """A ConfigMap volume's layout: the files are symlinks into `..data`, a
    symlink to a timestamped directory that the kubelet swaps in one rename.
    The hidden directories are not read themselves; each swap is one change."""
    clock = Clock()
    s = ManifestSource(tmp_path, publish=lambda e: None, clock=clock)

    def version(name: str, ip: str) -> None:
        d = tmp_path / name
        d.mkdir()
        write(d / "a.yaml", service("a"), slice_("a", endpoints=[endpoint(ip)]))
        (tmp_path / "..data.tmp").symlink_to(name)
        (tmp_path / "..data.tmp").rename(tmp_path / "..data")

    version("..2026_12_01_v1", "10.0.0.1")
    (tmp_path / "a.yaml").symlink_to("..data/a.yaml")
    assert events(s) == ["ADDED Service default/a", "ADDED EndpointSlice default/a-abc"]
    version("..2026_12_01_v2", "10.0.0.2")
    clock.now = time.time()
    assert events(s) == ["MODIFIED EndpointSlice default/a-abc"]
    assert events(s) == []


def test_a_directory_that_disappears_keeps_everything_served(tmp_path: Path) -> None:
    """The directory moved away (`mv dir dir.old; mv dir.new dir`, caught in
    between) or deleted: nothing is withdrawn; the problem is logged and
    reported once; when it is back, only real differences are events."""
    d = tmp_path / "m"
    d.mkdir()
    got: list[tuple[str, str]] = []
    s = ManifestSource(d, publish=lambda e: None, on_error=lambda r, m: got.append((r, m)),
                       clock=lambda: time.time() + 60)
    write(d / "a.yaml", service("a"))
    write(d / "b.yaml", service("b", cluster_ip="10.96.0.11"))
    events(s)
    d.rename(tmp_path / "m.old")
    assert events(s) == [] and events(s) == []
    assert got == [("files", f"{d}: the manifest directory is gone (or not a directory); "
                             "serving what it held until it is back")]
    assert sorted(k for _, k in s.objects) == ["default/a", "default/b"]
    new = tmp_path / "m.new"
    new.mkdir()
    write(new / "a.yaml", service("a"))
    new.rename(d)
    assert events(s) == []  # b.yaml is gone at one scan only so far
    assert events(s) == ["DELETED Service default/b"]
    assert len(got) == 1


def test_file_problems_are_reported_once_each(tmp_path: Path) -> None:
    got: list[tuple[str, str]] = []
    s = ManifestSource(tmp_path, publish=lambda e: None, on_error=lambda r, m: got.append((r, m)),
                       clock=lambda: time.time() + 60)
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: a\n")
    events(s)
    events(s)
    (tmp_path / "b.yaml").write_text("[")
    events(s)
    assert [r for r, _ in got] == ["files", "files"]
    assert str(tmp_path / "a.yaml") in got[0][1] and str(tmp_path / "b.yaml") in got[1][1]


def test_a_file_open_for_writing_is_not_used_until_closed(tmp_path: Path) -> None:
    """A writer that stopped half-way for longer than a poll interval but has
    not closed the file (the kernel refuses a read lease on a file open for
    writing): not used, however long it looks settled; used once closed."""
    s = ManifestSource(tmp_path, publish=lambda e: None, clock=lambda: time.time() + 60)
    path = tmp_path / "a.yaml"
    write(path, service("a"), slice_("a", endpoints=[endpoint("10.0.0.1")]))
    events(s)
    full = path.read_text()
    cut = full.index("---")
    with open(path, "r+") as writer:
        writer.truncate(0)
        writer.write(full[:cut])  # the Service, not yet the slice
        writer.flush()
        for _ in range(3):
            assert events(s) == []
        assert "default/a-abc" in {k for _, k in s.objects}
        writer.write(full[cut:].replace("10.0.0.1", "10.0.0.2"))
    assert events(s) == ["MODIFIED EndpointSlice default/a-abc"]


def test_a_file_held_open_for_ever_is_used_after_a_while(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ManifestSource, "WRITE_WAIT", 0.0)
    s = ManifestSource(tmp_path, publish=lambda e: None, clock=lambda: time.time() + 60)
    events(s)
    with open(tmp_path / "a.yaml", "w") as writer:
        writer.write(yaml.safe_dump(service("a")))
        writer.flush()
        assert events(s) == ["ADDED Service default/a"]
