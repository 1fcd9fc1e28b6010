"""Read-only mappings that share an unchanged base, so a partial plan costs what
changed, not the size of the cluster.

A partial plan used to copy the previous plan's three dicts (frontends,
Services, frontend keys per Service): at 10,000 Services those copies were
nearly all of a one-endpoint re-plan. `Layered` is the previous mapping plus
the keys replaced, added or removed since; `edit(previous)` starts a new one
without touching `previous` (which other threads may be reading, and which
stays the applied plan if the sync fails). Once the changes outgrow
sqrt(len(base)), `finish()` folds them into a new plain dict: each partial
plan then copies O(sqrt N) entries, and a flattening copy of O(N) comes once
every ~sqrt(N) changes.

The base dict is never mutated after it is shared; iteration is the base's
order followed by added keys, so it is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING = object()


class Layered(Mapping[K, V], Generic[K, V]):
    __slots__ = ("_base", "_gone", "_len", "_upd")

    def __init__(self, base: Mapping[K, V], upd: dict[K, V], gone: set[K]) -> None:
        self._base = base
        self._upd = upd
        self._gone = gone
        self._len = len(base) - len(gone) + sum(1 for k in upd if k not in base)

    def __getitem__(self, key: K) -> V:
        upd = self._upd
        if key in upd:
            return upd[key]
        if key in self._gone:
            raise KeyError(key)
        return self._base[key]

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        value = self._upd.get(key, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[return-value]
        if key in self._gone:
            return default
        return self._base.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._upd or (key not in self._gone and key in self._base)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        gone, upd, base = self._gone, self._upd, self._base
        for key in base:
            if key not in gone:
                yield key
        for key in upd:
            if key not in base:
                yield key

    def __repr__(self) -> str:
        return f"Layered({dict(self.items())!r})"


class Editor(MutableMapping[K, V], Generic[K, V]):
    """Changes on top of a mapping that stays as it is; `finish()` returns the
    new mapping (a Layered, or a fresh dict once the layer is large)."""

    def __init__(self, previous: Mapping[K, V]) -> None:
        if isinstance(previous, Layered):
            self._base: Mapping[K, V] = previous._base
            self._upd: dict[K, V] = dict(previous._upd)
            self._gone: set[K] = set(previous._gone)
        else:
            self._base, self._upd, self._gone = previous, {}, set()

    def __getitem__(self, key: K) -> V:
        if key in self._upd:
            return self._upd[key]
        if key in self._gone:
            raise KeyError(key)
        return self._base[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._upd[key] = value
        self._gone.discard(key)

    def __delitem__(self, key: K) -> None:
        if key not in self:
            raise KeyError(key)
        self._upd.pop(key, None)
        if key in self._base:
            self._gone.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._upd or (key not in self._gone and key in self._base)

    def __iter__(self) -> Iterator[K]:
        return iter(Layered(self._base, self._upd, self._gone))

    def __len__(self) -> int:
        return len(Layered(self._base, self._upd, self._gone))

    def finish(self) -> Mapping[K, V]:
        base, upd, gone = self._base, self._upd, self._gone
        if len(upd) + len(gone) <= max(32, int(len(base) ** 0.5)):
            return Layered(base, upd, gone)
        flat = dict(base)
        for key in gone:
            del flat[key]
        flat.update(upd)
        return flat
