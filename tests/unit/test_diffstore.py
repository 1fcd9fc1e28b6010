"""The generic diff store every reconciler uses: full and partial syncs differ
only in the keys compared; a failed apply makes what it touched unknown."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from svcproxy.diffstore import Diff, DiffStore, diff_items

KEYS = st.integers(0, 12)
STATES = st.dictionaries(KEYS, st.integers(0, 3), max_size=10)


def apply(have: dict[int, int], diff: Diff[int, int]) -> dict[int, int]:
    out = {k: v for k, v in have.items() if k not in diff.deleted}
    out.update(diff.created)
    out.update({k: new for k, (_, new) in diff.updated.items()})
    return out


@given(STATES, STATES)
def test_a_full_diff_applied_gives_the_desired_state(have: dict[int, int],
                                                      want: dict[int, int]) -> None:
    diff = diff_items(have, want)
    assert apply(have, diff) == want
    # only real changes: nothing created that was there, nothing updated to itself
    assert not set(diff.created) & set(have)
    assert all(old != new for old, new in diff.updated.values())
    assert bool(diff) == (have != want)


@given(STATES, STATES, st.sets(KEYS))
def test_a_partial_diff_changes_exactly_the_scope(have: dict[int, int], want: dict[int, int],
                                                  scope: set[int]) -> None:
    result = apply(have, diff_items(have, want, scope))
    for key in set(have) | set(want) | scope:
        expected = want.get(key) if key in scope else have.get(key)
        assert result.get(key) == expected


def test_store_records_applied_diffs_and_compares_the_scope_only() -> None:
    store: DiffStore[str, int] = DiffStore()
    assert store.unread and not store.known
    store.load({"a": 1, "b": 2, "stray": 9})
    assert store.known
    full = store.diff({"a": 1, "b": 3, "c": 4})
    assert (full.created, full.updated, full.deleted) == ({"c": 4}, {"b": (2, 3)},
                                                         {"stray": 9})
    store.applied(full)
    assert store.have == {"a": 1, "b": 3, "c": 4}
    # a partial sync that names only "a" does not see "c" go
    partial = store.diff({"a": 5}, scope=["a"])
    assert (partial.updated, partial.deleted) == ({"a": (1, 5)}, {})


def test_a_failed_apply_makes_its_keys_unknown_until_read_back() -> None:
    store: DiffStore[str, int] = DiffStore()
    store.load({"a": 1, "b": 2})
    store.forget(["b"])
    assert not store.known and not store.unread
    assert store.unknown(["a"]) == set() and store.unknown(["a", "b"]) == {"b"}
    assert store.unknown() == {"b"}
    store.load({"b": 7}, keys=["b"])  # what the kernel really holds
    assert store.known and store.have == {"a": 1, "b": 7}
    store.load({}, keys=["a"])  # read back: gone from the kernel
    assert store.have == {"b": 7}
    store.forget()
    assert store.unread
