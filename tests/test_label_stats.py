"""Label statistics: frequencies and P(b | a) on label tables with a known answer, each warning from a table built
to trigger it, and odd tables (a class without images, every image holding every class, a single class)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.label_stats import FEW_IMAGES, LabelStats, context_of, label_stats, label_warnings


def kinds(stats: LabelStats) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    for w in label_warnings(stats):
        out.setdefault(w.kind, []).append(w.classes)
    return out


def test_frequencies_and_conditional_shares_on_a_known_table():
    # boat always with water; water alone twice; grass alone three times; each image ten times over
    labels = [(0, 1), (0, 1), (1,), (1,), (2,), (2,), (2,), (1, 2)] * 10
    stats = label_stats(["boat", "water", "grass"], labels)
    assert stats.images == 80
    np.testing.assert_array_equal(stats.counts, [20, 50, 40])
    np.testing.assert_allclose(stats.frequency, [0.25, 0.625, 0.5])
    cond = stats.conditional
    assert cond[0, 1] == 1.0  # P(water | boat)
    assert cond[1, 0] == pytest.approx(2 / 5)  # P(boat | water)
    assert cond[1, 2] == pytest.approx(1 / 5)
    assert cond[2, 1] == pytest.approx(1 / 4)
    np.testing.assert_allclose(np.diag(cond), 1.0)
    assert context_of(stats, 0.9) == {"boat": ["water"]}
    assert context_of(stats, 0.4) == {"boat": ["water"], "water": ["boat"]}
    # the same shares from a tenth of the images are too few to bind boat to water
    assert context_of(label_stats(["boat", "water", "grass"], labels[:8]), 0.9) == {}
    round_trip = LabelStats.from_json(stats.to_json())
    np.testing.assert_array_equal(round_trip.together, stats.together)
    assert round_trip.classes == stats.classes


def test_each_warning_from_a_table_built_to_trigger_it():
    n = 40
    # sky in every image: ubiquitous; face and body always together: inseparable; boat always with water
    # (water often alone): bound; rare in 3 images: few
    labels = []
    for i in range(n):
        lab = {0}  # sky
        if i < 12:
            lab |= {1, 2}  # face, body
        if 12 <= i < 24:
            lab |= {3, 4}  # boat, water
        if 24 <= i < 36:
            lab |= {4}
        if i < 3:
            lab |= {5}
        labels.append(tuple(sorted(lab)))
    stats = label_stats(["sky", "face", "body", "boat", "water", "rare", "absent"], labels)
    found = kinds(stats)
    assert found["ubiquitous"] == [("sky",)]
    assert found["inseparable"] == [("face", "body")]  # each pair once
    assert ("boat", "water") in found["bound"] and ("water", "boat") not in found["bound"]
    assert found["few"] == [("rare",)] and FEW_IMAGES > 3
    assert found["absent"] == [("absent",)]
    # every class is bound to sky (it is in all their images): the statistics say so too
    assert ("boat", "sky") in found["bound"]
    messages = {w.kind: w.message for w in label_warnings(stats)}
    assert "add photos" in messages["inseparable"] and "'face'" in messages["inseparable"]
    assert "100%" in messages["ubiquitous"]


@pytest.mark.parametrize("classes, labels, expect", [
    (["a", "b"], [(0,), (0,)], {"absent": [("b",)], "few": [("a",)], "ubiquitous": [("a",)]}),
    (["a", "b", "c"], [(0, 1, 2)] * 12, {"ubiquitous": [("a",), ("b",), ("c",)],
                                          "inseparable": [("a", "b"), ("a", "c"), ("b", "c")]}),
    (["only"], [(0,)] * 20, {"ubiquitous": [("only",)]}),
])
def test_odd_tables_give_warnings_never_a_crash(classes, labels, expect):
    stats = label_stats(classes, labels)
    assert kinds(stats) == expect
    data = stats.to_json()  # a class without images has no shares (null), not NaN
    if "absent" in expect:
        assert data["conditional"]["b"]["a"] is None
    assert isinstance(context_of(stats, 0.9), dict)


def test_an_empty_table_gives_warnings_only():
    stats = label_stats(["a"], [])
    assert [w.kind for w in label_warnings(stats)] == ["absent"]
    assert context_of(stats, 0.9) == {}
