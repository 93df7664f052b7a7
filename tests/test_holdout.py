"""holdout.py: selection and held-out parts are disjoint, seeded, stratified by class, and refused when too small."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.errors import InvalidInput
from leanserve.holdout import MIN_PART_ROWS, given_holdout, split_holdout


def _data(rows: int = 100, classes: int = 4) -> dict[str, np.ndarray]:
    # row i holds the value i, so the parts' rows can be traced back to the original
    return {"x": np.arange(rows, dtype=np.float32).reshape(rows, 1), "labels": np.arange(rows) % classes}


def test_split_parts_are_disjoint_and_cover_every_row():
    split = split_holdout(_data(), holdout_fraction=0.3, seed=0)
    chosen, held = set(split.selection["x"][:, 0]), set(split.holdout["x"][:, 0])
    assert not chosen & held
    assert chosen | held == set(range(100))
    assert (split.info.selection_rows, split.info.holdout_rows) == (70, 30)


def test_split_keeps_each_row_with_its_label():
    split = split_holdout(_data(), seed=3)
    for part in (split.selection, split.holdout):
        assert np.array_equal(part["x"][:, 0].astype(int) % 4, part["labels"])


def test_split_is_stratified_by_class_labels():
    split = split_holdout(_data(120, classes=4), holdout_fraction=0.2, seed=1)
    assert split.info.stratified
    assert np.bincount(split.holdout["labels"]).tolist() == [6, 6, 6, 6]


def test_float_labels_are_not_stratified():
    data = {"x": np.zeros((50, 2), np.float32), "labels": np.linspace(0, 1, 50)}
    assert not split_holdout(data).info.stratified


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (split_holdout(_data(), seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.holdout["x"], b.holdout["x"])
    assert not np.array_equal(a.holdout["x"], c.holdout["x"])
    assert a.info.to_dict() == {"source": "split", "selection_rows": 70, "holdout_rows": 30, "seed": 5,
                                "holdout_fraction": 0.3, "stratified": True}


def test_too_small_data_is_refused_with_the_numbers():
    with pytest.raises(InvalidInput, match=r"20 rows.*14 selection and 6 held-out.*at least 10.*at least 32 rows"):
        split_holdout(_data(20), holdout_fraction=0.3)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(InvalidInput, match="holdout_fraction: expected a number between 0 and 1"):
        split_holdout(_data(), holdout_fraction=fraction)


def test_given_holdout_uses_both_sets_whole():
    split = given_holdout(_data(40), _data(25))
    assert (split.info.source, split.info.selection_rows, split.info.holdout_rows) == ("given", 40, 25)
    assert split.info.seed is None and "given separately" in split.info.describe()


def test_given_holdout_refuses_other_arrays_or_too_few_rows():
    with pytest.raises(InvalidInput, match="expected the same names"):
        given_holdout(_data(40), {"x": np.zeros((40, 1), np.float32)})
    with pytest.raises(InvalidInput, match=f"held-out data has 3 rows; expected at least {MIN_PART_ROWS}"):
        given_holdout(_data(40), _data(3))
