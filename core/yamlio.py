"""YAML loading that remembers where each mapping started, so errors about a
field or an object can name the line a user has to fix — and, for large
inputs, loading that does not (`load_fast`: C parsers, several times faster),
with the line-remembering pass run only when there is an error to report."""

from __future__ import annotations

import json
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


def load_fast(text: str) -> list[Any]:
    """Every document, as load_documents returns them but without line
    numbers: JSON text through the json module, YAML through libyaml. Raises
    ValueError or yaml.YAMLError on bad input (parse again with load_documents
    for the line to report)."""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            doc = json.loads(text)
        except ValueError:
            pass  # YAML flow style, or broken: libyaml says which
        else:
            return [] if doc is None else [doc]
    return [doc for doc in yaml.load_all(text, Loader=_FAST_LOADER) if doc is not None]


def syntax_error_line(exc: yaml.YAMLError) -> int | None:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def syntax_error_text(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    return f"invalid YAML: {exc}"
