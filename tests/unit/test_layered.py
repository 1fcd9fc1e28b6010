"""Layered mappings (partial plans share the previous plan's unchanged entries):
checked against plain dicts under random edits, and the previous mapping never
changes."""

from __future__ import annotations

import random

import pytest

from svcproxy.layered import Editor, Layered


def test_random_edits_match_a_dict_and_leave_the_previous_mapping_alone() -> None:
    rng = random.Random(7)
    current: object = {k: f"v{k}" for k in range(1000)}
    model = dict(current)  # type: ignore[call-overload]
    layered_seen = flattened_seen = False
    for _ in range(400):
        before = dict(current.items())  # type: ignore[attr-defined]
        ed = Editor(current)  # type: ignore[arg-type]
        for _ in range(rng.randint(1, 4)):
            key = rng.randrange(1200)
            if rng.random() < 0.4:
                assert ed.pop(key, None) == model.pop(key, None)
            else:
                ed[key] = model[key] = f"x{rng.random()}"
            assert (key in ed) == (key in model) and ed.get(key) == model.get(key)
        new = ed.finish()
        layered_seen |= isinstance(new, Layered)
        flattened_seen |= isinstance(new, dict)
        assert dict(current.items()) == before  # type: ignore[attr-defined]
        assert len(new) == len(model) and dict(new.items()) == model and new == model
        assert sorted(new) == sorted(model) and len(list(new)) == len(model)
        assert sorted(new.values(), key=str) == sorted(model.values(), key=str)
        for probe in (rng.randrange(1200) for _ in range(20)):
            assert (probe in new) == (probe in model)
            assert new.get(probe) == model.get(probe)
            if probe not in model:
                with pytest.raises(KeyError):
                    new[probe]
        current = new
    assert layered_seen and flattened_seen


def test_small_edits_stay_layered_and_iterate_in_a_stable_order() -> None:
    base = {k: k for k in range(10000)}
    ed = Editor(base)
    del ed[5]
    ed[5] = 50  # re-added after a delete: back in its place
    ed[10001] = 1
    del ed[7]
    new = ed.finish()
    assert isinstance(new, Layered) and base[5] == 5 and 7 in base
    keys = list(new)
    assert keys[:8] == [0, 1, 2, 3, 4, 5, 6, 8] and keys[-1] == 10001 and len(new) == 10000
    assert new[5] == 50 and 7 not in new and new.get(7, "none") == "none"
    # a layer over a layer shares the same base
    ed2 = Editor(new)
    ed2[3] = 30
    newer = ed2.finish()
    assert isinstance(newer, Layered) and newer[3] == 30 and new[3] == 3 and newer[5] == 50
