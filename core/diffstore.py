"""Desired state -> diff -> apply: the one reconciling store every datapath
subsystem uses (virtual servers, real servers, kube-ipvs0 addresses, ipset
members, iptables chains; later nftables elements). The shape of kpng's
client/diffstore: declare what should be, get what was created, updated and
deleted, apply that, record it.

A store remembers what the kernel holds as far as svcproxy knows. A full sync
compares every key (`scope=None`); a partial sync compares only the keys it
names (the dirty frontends' keys), in the same code path. When an apply fails,
the keys it touched become unknown (`forget`), and the next sync reads them
back from the kernel (`unknown` / `load`) before comparing: the store never
claims what it cannot know.

No kernel code here: the reader and the applier are the datapath's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Diff(Generic[K, V]):
    """What to change: created {key: new}, updated {key: (old, new)}, deleted
    {key: old}. Insertion order follows the desired mapping (created, updated)
    and the store (deleted)."""

    created: dict[K, V] = field(default_factory=dict)
    updated: dict[K, tuple[V, V]] = field(default_factory=dict)
    deleted: dict[K, V] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def __len__(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


def diff_items(have: Mapping[K, V], want: Mapping[K, V],
               scope: Iterable[K] | None = None, *,
               adopt: dict[K, V] | None = None) -> Diff[K, V]:
    """The difference from `have` to `want`, over every key (`scope` None) or
    only the keys in `scope` (a key in scope that `want` lacks is deleted if
    `have` has it). `adopt` (the dict behind `have`): where a value equals the
    wanted one but is another object (read from the kernel, the wanted one
    rendered), the wanted key and value take its place, so one copy is kept."""
    out: Diff[K, V] = Diff()
    if scope is None:
        for key, new in want.items():
            old = have.get(key)
            if old is None:
                out.created[key] = new
            elif old is not new:
                if old != new:
                    out.updated[key] = (old, new)
                elif adopt is not None:
                    del adopt[key]  # the wanted key object too
                    adopt[key] = new
        out.deleted = {k: v for k, v in have.items() if k not in want}
        return out
    for key in scope:
        new_or_none = want.get(key)
        old = have.get(key)
        if new_or_none is None:
            if old is not None:
                out.deleted[key] = old
        elif old is None:
            out.created[key] = new_or_none
        elif old is not new_or_none:
            if old != new_or_none:
                out.updated[key] = (old, new_or_none)
            elif adopt is not None:
                del adopt[key]
                adopt[key] = new_or_none
    return out


class DiffStore(Generic[K, V]):
    """What the kernel holds for one subsystem, keyed, as far as svcproxy knows.

    Typical use by a reconciler::

        if store.unread:
            store.load(read_everything())
        elif need := store.unknown(scope):
            store.load(read_keys(need), need)
        diff = store.diff(desired, scope)
        ... apply diff ...
        store.applied(diff)                   # or store.forget(touched) on failure
    """

    def __init__(self) -> None:
        self.have: dict[K, V] = {}
        #: keys whose kernel state is unknown; None: the whole store (never read,
        #: or forgotten as a whole)
        self._unknown: set[K] | None = None

    def __len__(self) -> int:
        return len(self.have)

    def __contains__(self, key: object) -> bool:
        return key in self.have

    def get(self, key: K) -> V | None:
        return self.have.get(key)

    @property
    def known(self) -> bool:
        """Whether nothing in the store needs reading back."""
        return self._unknown is not None and not self._unknown

    @property
    def unread(self) -> bool:
        """Whether the whole subsystem must be read before any comparison."""
        return self._unknown is None

    def unknown(self, scope: Iterable[K] | None = None) -> set[K]:
        """The keys (of `scope`, None: all) to read back before comparing; only
        meaningful when not `unread`."""
        if not self._unknown:
            return set()
        if scope is None:
            return set(self._unknown)
        return self._unknown.intersection(scope)

    def load(self, items: Mapping[K, V], keys: Iterable[K] | None = None) -> None:
        """Record what the kernel holds: for every key (`keys` None: `items` is
        the whole subsystem) or for the given keys only."""
        if keys is None:
            self.have = dict(items)
            self._unknown = set()
            return
        assert self._unknown is not None, "the whole store is unknown: load it all"
        for key in keys:
            value = items.get(key)
            if value is None:
                self.have.pop(key, None)
            else:
                self.have[key] = value
            self._unknown.discard(key)

    def diff(self, desired: Mapping[K, V], scope: Iterable[K] | None = None) -> Diff[K, V]:
        """What differs between the store and `desired`, over every key (`scope`
        None: a full sync) or over the keys in `scope` (a partial sync).
        Values equal to the desired ones are replaced by the desired objects
        (the same content: a store loaded from the kernel would otherwise keep
        a second copy of every unchanged chain or server beside the rendering
        the datapath keeps — tens of MB at 10,000 services)."""
        return diff_items(self.have, desired, scope, adopt=self.have)

    def applied(self, diff: Diff[K, V]) -> None:
        """The kernel took `diff`: record it."""
        have = self.have
        for key in diff.deleted:
            have.pop(key, None)
        have.update(diff.created)
        for key, (_, new) in diff.updated.items():
            have[key] = new

    def set(self, key: K, value: V | None) -> None:
        """Record one key's kernel state directly (None: absent)."""
        if value is None:
            self.have.pop(key, None)
        else:
            self.have[key] = value

    def forget(self, keys: Iterable[K] | None = None) -> None:
        """The kernel state of `keys` (None: everything) is unknown now — an apply
        that touched them failed part-way; the next sync reads them back."""
        if keys is None or self._unknown is None:
            self._unknown = None
            return
        self._unknown.update(keys)

    def reset(self) -> None:
        """Forget everything (the next sync reads the whole subsystem)."""
        self.have = {}
        self._unknown = None
