"""YAML loading that remembers where each mapping started, so errors about a
field or an object can name the line a user has to fix — and, for large
inputs, loading that does not (`load_fast`: C parsers, several times faster),
with the line-remembering pass run only when there is an error to report."""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator
from typing import Any

import yaml
from yaml.nodes import MappingNode


class LineDict(dict[str, Any]):
    """A dict that remembers the 1-based line its YAML mapping started on."""

    line: int | None = None
    #: 1-based line of each key of the mapping
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: MappingNode) -> Any:
    data = LineDict()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    for key_node, _ in node.value:
        if isinstance(key_node.value, str):
            data.key_lines[key_node.value] = key_node.start_mark.line + 1
    yield data
    data.update({str(k): v for k, v in loader.construct_mapping(node, deep=False).items()})


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def line_of(obj: Any, key: str | None = None) -> int | None:
    """The line a mapping loaded by this module started on (or that of one of its
    keys), if known."""
    if not isinstance(obj, LineDict):
        return None
    if key is not None and key in obj.key_lines:
        return obj.key_lines[key]
    return obj.line


def load_documents(text: str) -> list[Any]:
    """Every document of a (multi-document) YAML or JSON text, empty ones dropped.

    Raises yaml.YAMLError (with a problem_mark) on a syntax error."""
    return [doc for doc in yaml.load_all(text, Loader=_LineLoader) if doc is not None]


#: libyaml's loader where PyYAML was built with it (Debian's and PyPI's are)
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_fast(text: str) -> list[Any] | Iterator[Any]:
    """Every document, as load_documents returns them but without line
    numbers: JSON text through the json module, YAML through libyaml, one
    document at a time (so a multi-document file's trees are not all held at
    once). Raises ValueError or yaml.YAMLError on bad input, possibly after
    some documents (parse again with load_documents for the line to report)."""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            doc = json.loads(text)
        except ValueError:
            pass  # YAML flow style, or broken: libyaml says which
        else:
            return [] if doc is None else [doc]
    return (doc for doc in yaml.load_all(text, Loader=_FAST_LOADER) if doc is not None)


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, idx: int) -> int:
    """The index of the first non-whitespace character from idx."""
    found = _WS.match(text, idx)
    return found.end() if found else idx


class JsonObject:
    """A JSON text holding one object, read key by key, its "items" array (a
    List's, `kubectl get -o json`'s) element by element: `items()` yields each
    element as soon as it is parsed, so a caller that turns it into something
    smaller and drops it never holds the whole tree. (A 10,000-Service List's
    tree is ~3x the objects made of it; parsed whole, it left ~40 MB of freed
    but fragmented heap behind.) After `items()` is exhausted, `head` holds the
    object's other keys (`kind` may come after `items`: kubectl sorts them) and
    `streamed` says whether it had an "items" array. The same values as
    json.loads, or ValueError where json.loads raises it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.head: dict[str, Any] = {}
        self.streamed = False

    @staticmethod
    def holds_object(text: str) -> bool:
        return text[_skip(text, 0):][:1] == "{"

    def _expect(self, idx: int, chars: str) -> tuple[int, str]:
        idx = _skip(self.text, idx)
        char = self.text[idx:idx + 1]
        if not char or char not in chars:
            raise ValueError(f"JSON: expected one of {chars!r} at character {idx}")
        return _skip(self.text, idx + 1), char

    def items(self) -> Iterator[Any]:
        text = self.text
        idx, _ = self._expect(0, "{")
        closing = text.startswith("}", idx)
        idx += closing
        while not closing:
            if not text.startswith('"', idx):
                raise ValueError(f"JSON: expected a key at character {idx}")
            key, idx = _scanstring(text, idx + 1)
            idx, _ = self._expect(idx, ":")
            if key == "items" and text.startswith("[", idx) and not self.streamed:
                self.streamed = True
                idx = yield from self._array(idx)
            else:
                self.head[key], idx = _DECODER.raw_decode(text, idx)
            idx, char = self._expect(idx, ",}")
            closing = char == "}"
        if _skip(text, idx) != len(text):
            raise ValueError(f"JSON: extra data at character {idx}")

    def _array(self, idx: int) -> Generator[Any, None, int]:
        """The elements of the array at idx; returns the index after it."""
        text = self.text
        idx = _skip(text, idx + 1)
        if text.startswith("]", idx):
            return idx + 1
        while True:
            item, idx = _DECODER.raw_decode(text, idx)
            yield item
            idx, char = self._expect(idx, ",]")
            if char == "]":
                return idx


def syntax_error_line(exc: yaml.YAMLError) -> int | None:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def syntax_error_text(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    return f"invalid YAML: {exc}"
