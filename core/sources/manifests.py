"""The manifest source: Services, EndpointSlices and Nodes from a directory of
YAML/JSON files (multi-document files and `kind: List`, as `kubectl get -o yaml`
writes them), watched for changes.

Each scan re-reads files whose content changed and publishes ADDED, MODIFIED and
DELETED events for objects whose content differs. A bad file is reported with
its name and line and skipped; its last good objects, and every other file's,
keep being served. Objects of other kinds (Pods, Deployments, ...) are ignored.

Files caught while being written are not used half-written. A file rewritten
in place (same inode) is not used while a process has it open for writing
(where the filesystem grants read leases, which tell), nor while it was
modified less than a poll interval ago until a later scan finds the same
content; a file replaced by a rename (a new
inode: `mv`, a ConfigMap volume's `..data` symlink swap) or new is used at
once; a file that disappears is dropped only when it is still gone at the next
scan (`rm` then `cp`). A directory that disappears keeps everything served
until it is back. Each problem is logged once and reported to the
`svcproxy_observe_source_error` observers (metrics count them).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..bus import Event, EventType
from ..datapath import WatchedKind
from ..errors import ManifestError, ObjectError
from ..gcpause import gc_paused
from ..model import PARSERS, ClusterObject, WatchedObject
from ..yamlio import (
    JsonObject,
    line_of,
    load_documents,
    load_fast,
    syntax_error_line,
    syntax_error_text,
)

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
ObjectKey = tuple[str, str]  # (kind, namespace/name)


def field_line(obj: Any, path: str) -> int | None:
    """Line of a field path such as "spec.ports[0].port" inside a loaded object."""
    line = line_of(obj)
    cur = obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            idx = int(part[1:-1])
            if not isinstance(cur, list) or idx >= len(cur):
                break
            cur = cur[idx]
            line = line_of(cur) or line
        else:
            if not isinstance(cur, Mapping) or part not in cur:
                break
            line = line_of(cur, part) or line
            cur = cur[part]
    return line


def _identity(raw: Mapping[str, Any]) -> ObjectKey | None:
    meta = raw.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    kind = str(raw.get("kind"))
    if kind == "Node":
        return kind, meta["name"]
    return kind, f"{meta.get('namespace') or 'default'}/{meta['name']}"


def _take(seq: Iterable[Any], consume: bool) -> Iterator[Any]:
    """The items in order; `consume` (a list): each taken out of it as it is
    yielded, so a parse tree shrinks while the model made of it grows."""
    if not consume or not isinstance(seq, list):
        yield from seq
        return
    seq.reverse()
    while seq:
        yield seq.pop()


def _items(doc: Any, consume: bool = False) -> Iterator[Any]:
    """Flatten `kind: List` (and `ServiceList` etc.) documents (`consume`:
    see _take; a 10,000-Service List's tree is larger than its objects)."""
    if isinstance(doc, Mapping) and isinstance(doc.get("items"), list) and \
            str(doc.get("kind", "")).endswith("List"):
        item_kind = str(doc["kind"])[:-4]
        for item in _take(doc["items"], consume):
            if isinstance(item, dict) and "kind" not in item and item_kind in PARSERS:
                item["kind"] = item_kind  # typed lists may omit the items' kind
            yield item
    else:
        yield doc


def _flat(docs: Iterable[Any], consume: bool = False) -> Iterator[tuple[Any, Any]]:
    """(document, object) for each object of the documents (_take, _items)."""
    for doc in _take(docs, consume):
        for raw in _items(doc, consume):
            yield doc, raw


def _streamed(doc: JsonObject) -> Iterator[tuple[Any, Any]]:
    """What _items yields for a JSON object, its items parsed one at a time
    (JsonObject). Raises ValueError where that cannot be known as they come:
    an item without a kind before the List's kind is known, or an object that
    turns out not to be a List (the caller parses the text whole then)."""
    for item in doc.items():
        kind = doc.head.get("kind")
        if isinstance(item, dict) and "kind" not in item:
            if not (isinstance(kind, str) and kind.endswith("List")):
                raise ValueError("a List item without a kind, before the List's kind")
            if kind[:-4] in PARSERS:
                item["kind"] = kind[:-4]  # typed lists may omit the items' kind
        yield None, item
    kind = doc.head.get("kind")
    if not doc.streamed:
        yield from _flat([doc.head])
    elif "items" in doc.head or not (isinstance(kind, str) and kind.endswith("List")):
        raise ValueError("not a List")


@dataclass
class _FileState:
    digest: str = ""
    #: (device, inode) of the content in use: another one means the file was
    #: replaced whole, not being rewritten in place
    inode: tuple[int, int] = (0, 0)
    objects: dict[ObjectKey, ClusterObject | WatchedObject] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)


F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


def being_written(path: Path) -> bool:
    """Whether some process has `path` open for writing: the kernel refuses a
    read lease on such a file (EAGAIN). Tried only where a broken lease cannot
    hurt (SIGIO ignored) and the filesystem supports leases; False otherwise."""
    if signal.getsignal(signal.SIGIO) != signal.SIG_IGN:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # a symlink (ConfigMap volume: replaced whole, never in place)
        return False
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    else:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class ManifestSource:
    """Reads and watches one directory of manifests."""

    #: how long a file open for writing is waited for before it is used anyway
    WRITE_WAIT = 30.0

    def __init__(self, directory: str | Path, publish: Callable[[Event], object], *,
                 poll_interval: float = 1.0,
                 extra_kinds: Sequence[WatchedKind] = (),
                 on_error: Callable[[str, str], object] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        #: kind -> parser: the core's kinds and those plugins asked for
        self.parsers: dict[str, Callable[[Any], Any]] = {
            **PARSERS, **{k.kind: k.parse for k in extra_kinds}}
        self.publish = publish
        self.poll_interval = poll_interval
        self.name = f"manifests:{self.directory}"
        self._files: dict[Path, _FileState] = {}
        self._served: dict[ObjectKey, ClusterObject | WatchedObject] = {}
        self._reported: set[str] = set()
        #: called with ("files", message) once for each new problem
        self.on_error = on_error
        self.clock = clock
        #: files seen changed (digest) or gone ("") at the last scan and not
        #: used yet: a later scan that sees the same uses them
        self._pending: dict[Path, str] = {}
        self._scans = 0
        self._missing = False
        #: files found open for writing, since when (monotonic; -1: waited enough)
        self._writing: dict[Path, float] = {}
        if threading.current_thread() is threading.main_thread():
            # a read lease (being_written) that a writer breaks raises SIGIO at
            # its holder, whose default action would end the process
            signal.signal(signal.SIGIO, signal.SIG_IGN)

    @property
    def errors(self) -> list[ManifestError]:
        """Problems found in the current files, in file order."""
        return [e for p in sorted(self._files) for e in self._files[p].errors]

    @property
    def objects(self) -> dict[ObjectKey, ClusterObject | WatchedObject]:
        return dict(self._served)

    def check_directory(self) -> None:
        if not self.directory.is_dir():
            raise ManifestError(str(self.directory), "not a directory")

    def _paths(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*")
                      if p.suffix in SUFFIXES and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(
                          self.directory).parts))

    def _parse_file(self, path: Path, text: str, digest: str,
                    previous: _FileState) -> _FileState:
        """The file's objects, parsed fast (C parsers, no line numbers); when
        something in it is wrong, parsed again remembering lines, so the error
        names the line to fix. (A 10,000-Service List spent nearly all its time
        in the line-remembering pure-Python loader.)"""
        # a JSON object (a List) item by item, else JSON or YAML document by
        # document; anything wrong: parsed again remembering lines
        attempts: list[Callable[[], Iterator[tuple[Any, Any]]]] = [
            lambda: _flat(load_fast(text), consume=True)]
        if JsonObject.holds_object(text):
            attempts.insert(0, lambda: _streamed(JsonObject(text)))
        for attempt in attempts:
            try:
                # (consumed as it is read: a failure parses the text again anyway)
                state = self._objects(path, attempt(), previous)
            except (ValueError, yaml.YAMLError):
                continue  # (not a List after all, or broken)
            if not state.errors:
                state.digest = digest
                return state
            break
        try:
            docs = load_documents(text)
        except yaml.YAMLError as exc:
            # keep serving the last good content
            return _FileState(digest=digest, objects=previous.objects, errors=[
                ManifestError(str(path), syntax_error_text(exc), syntax_error_line(exc))])
        state = self._objects(path, _flat(docs), previous)
        state.digest = digest
        return state

    def _objects(self, path: Path, raws: Iterable[tuple[Any, Any]],
                 previous: _FileState) -> _FileState:
        """The objects of (document, raw object) pairs (_flat, _streamed)."""
        state = _FileState()
        for doc, raw in raws:
            if not isinstance(raw, Mapping):
                state.errors.append(ManifestError(str(path), "a manifest must be a mapping",
                                                  line_of(doc)))
                continue
            parser = self.parsers.get(str(raw.get("kind")))
            if parser is None:
                continue
            ident = _identity(raw)
            try:
                obj = parser(raw)
            except ObjectError as exc:
                state.errors.append(ManifestError(str(path), str(exc),
                                                  field_line(raw, exc.field)))
                if ident is not None and ident in previous.objects:
                    state.objects[ident] = previous.objects[ident]
                continue
            key = (obj.kind, obj.key)
            if key in state.objects:
                state.errors.append(ManifestError(
                    str(path), f"{obj.kind} {obj.key} is defined twice; the first is used",
                    line_of(raw)))
                continue
            state.objects[key] = obj
        return state

    def scan(self) -> list[Event]:
        """Re-read changed files, publish the events and return them (with
        cyclic garbage collection paused: svcproxy.gcpause)."""
        with gc_paused():
            return self._scan()

    def _scan(self) -> list[Event]:
        self._scans += 1
        if not self.directory.is_dir():
            if not self._missing and self._scans > 1:
                self._missing = True
                message = (f"{self.directory}: the manifest directory is gone (or not a "
                           "directory); serving what it held until it is back")
                log.error("%s", message)
                self._error(message)
            return []
        if self._missing:
            self._missing = False
            log.warning("%s: the manifest directory is back", self.directory)
        seen: set[Path] = set()
        for path in self._paths():
            seen.add(path)
            self._scan_file(path)
        for gone in set(self._files) - seen:
            # dropped only if still gone at the next scan (rm, then cp)
            if self._scans == 1 or self._pending.get(gone) == "":
                del self._files[gone]
                self._pending.pop(gone, None)
            else:
                self._pending[gone] = ""
        for path in set(self._writing) - seen:  # a file held open, then removed
            del self._writing[path]
        self._report()
        return self._publish_changes()

    def _scan_file(self, path: Path) -> None:
        previous = self._files.get(path, _FileState())
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) else "not a UTF-8 text file"
            self._files[path] = _FileState(digest="", objects=previous.objects,
                                           errors=[ManifestError(str(path),
                                                                 f"cannot read: {msg}")])
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == previous.digest:
            self._pending.pop(path, None)
            self._writing.pop(path, None)
            return
        if self._scans > 1 and self._held_open(path):
            return
        inode = (st.st_dev, st.st_ino)
        rewritten = path in self._files and inode == previous.inode
        recent = self.clock() - st.st_mtime < self.poll_interval
        if rewritten and recent and self._pending.get(path) != digest and self._scans > 1:
            self._pending[path] = digest  # maybe half-written: use it if it stays so
            return
        self._pending.pop(path, None)
        state = self._parse_file(path, text, digest, previous)
        state.inode = inode
        self._files[path] = state

    def _held_open(self, path: Path) -> bool:
        """Whether a process has the file open for writing (so it may be half
        written): wait, but not for ever (WRITE_WAIT seconds, then use it)."""
        if not being_written(path):
            self._writing.pop(path, None)
            return False
        since = self._writing.setdefault(path, time.monotonic())
        if time.monotonic() - since < self.WRITE_WAIT:
            return True
        if since > 0:
            log.warning("%s is still open for writing after %.0fs; using it as it is", path,
                        self.WRITE_WAIT)
            self._writing[path] = -1.0  # said once
        return False

    def _error(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error("files", message)

    def _report(self) -> None:
        current = {str(e) for e in self.errors}
        for text in sorted(current - self._reported):
            log.error("%s; skipped", text)
            self._error(text)
        self._reported = current

    def _publish_changes(self) -> list[Event]:
        merged: dict[ObjectKey, ClusterObject | WatchedObject] = {}
        owner: dict[ObjectKey, Path] = {}
        for path in sorted(self._files):
            for key, obj in self._files[path].objects.items():
                if key in merged:
                    log.warning("%s %s is defined in %s and %s; using the first", key[0], key[1],
                                owner[key], path)
                    continue
                merged[key] = obj
                owner[key] = path
        events: list[Event] = []
        # Nodes first, then Services, then slices: a plan never sees a slice
        # before its Service within one scan.
        order = {"Node": 0, "Service": 1, "EndpointSlice": 2}
        for key in sorted(merged, key=lambda k: (order.get(k[0], 3), k)):
            old = self._served.get(key)
            if old is None:
                events.append(Event(EventType.ADDED, merged[key], self.name))
            elif old != merged[key]:
                events.append(Event(EventType.MODIFIED, merged[key], self.name))
        for key in sorted(set(self._served) - set(merged), key=lambda k: (-order[k[0]], k[1])):
            events.append(Event(EventType.DELETED, self._served[key], self.name))
        self._served = merged
        for event in events:
            self.publish(event)
        return events

    def watch(self, stop: threading.Event) -> None:
        """Poll for changes every poll_interval until `stop` is set."""
        while not stop.wait(self.poll_interval):
            try:
                self.scan()
            except Exception:  # a watcher must outlive any single bad scan
                log.exception("scanning %s failed", self.directory)
