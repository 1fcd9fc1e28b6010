"""Typed errors. Each carries the object, field and value that caused it so the
CLI can print one readable line instead of a traceback."""

from __future__ import annotations

from typing import Any


class SvcProxyError(Exception):
    """Base class for every error svcproxy reports to a user."""

    #: process exit status the CLI uses for this error
    exit_code = 1


class UsageError(SvcProxyError):
    """Bad command-line usage or bad input the user must fix (exit 2)."""

    exit_code = 2


def show(value: Any) -> str:
    """Render a bad value the way a user typed it: strings quoted, the rest as-is."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


class ConfigError(UsageError):
    """One or more problems in a configuration file."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in problems)
            text = f"{source}: {len(problems)} problems:\n{lines}"
        super().__init__(text)


class ConfigProblem:
    """A single bad field: where it is, what it holds and why that is wrong."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.line = line

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self.path!r}, {self.message!r}, line={self.line})"


class ObjectError(UsageError):
    """A malformed Kubernetes object (Service, EndpointSlice, Node)."""

    def __init__(self, kind: str, name: str, field: str, value: Any, problem: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{kind} {name}: {field}: {problem} (got {show(value)})")


class ManifestError(UsageError):
    """A manifest file that cannot be read or parsed."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


class PluginError(UsageError):
    """A plugin that cannot be found, loaded or configured."""


class DatapathUnavailable(SvcProxyError):
    """No datapath in the configured order can run on this node."""


class SyncError(SvcProxyError):
    """A datapath failed to apply a plan; the previous rules stay in place."""
