"""Reference profiles: which tensors are profiled per column or reduced, and the JSON they are stored as."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.errors import InvalidInput
from leanserve.monitor.profile import (
    PSI_BINS,
    QUANTILE_LEVELS,
    REDUCED_DIMS,
    CategoricalFeature,
    NumericFeature,
    Profile,
    ReducedProfile,
    TabularProfile,
    build_profile,
)


def mixed_arrays(rows: int = 600, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = np.column_stack([rng.normal(5.0, 2.0, rows), rng.integers(0, 3, rows), rng.integers(0, 1000, rows)])
    return {
        "table": table.astype(np.float32),
        "label": rng.integers(0, 4, rows),
        "image": rng.random((rows, 1, 6, 6), dtype=np.float32),
        "embedding": rng.normal(size=(rows, 100)),
    }


def test_two_dimensional_arrays_with_few_columns_are_profiled_column_by_column():
    profile = build_profile(mixed_arrays())
    table = profile.tensor("table")
    assert isinstance(table, TabularProfile)
    assert table.row_shape == (3,) and table.rows == 600
    assert [type(f) for f in table.features] == [NumericFeature, CategoricalFeature, NumericFeature]


def test_integer_valued_column_with_few_values_keeps_category_counts():
    arrays = mixed_arrays()
    feature = build_profile(arrays).tensor("table").features[1]
    categories, counts = np.unique(arrays["table"][:, 1], return_counts=True)
    assert feature.categories == tuple(int(c) for c in categories)
    assert feature.counts == tuple(int(n) for n in counts)


def test_one_dimensional_output_is_a_single_column():
    label = build_profile(mixed_arrays()).tensor("label")
    assert isinstance(label, TabularProfile) and label.row_shape == ()
    assert isinstance(label.features[0], CategoricalFeature) and sum(label.features[0].counts) == 600


def test_numeric_column_keeps_moments_quantiles_decile_bins_and_a_capped_sample():
    values = np.random.default_rng(1).normal(5.0, 2.0, 5000)
    feature = build_profile({"x": values[:, None]}, max_rows=300).tensor("x").features[0]
    assert feature.mean == pytest.approx(values.mean()) and feature.std == pytest.approx(values.std())
    assert feature.quantiles == pytest.approx(np.quantile(values, QUANTILE_LEVELS))
    assert len(feature.edges) == PSI_BINS - 1 and len(feature.fractions) == PSI_BINS
    assert feature.fractions == pytest.approx([0.1] * PSI_BINS, abs=1e-3)
    assert len(feature.sample) == 300 and set(feature.sample) <= set(values.tolist())


def test_images_and_wide_arrays_are_reduced_to_a_sample_of_projected_rows():
    profile = build_profile(mixed_arrays(), max_rows=250)
    for name, shape in (("image", (1, 6, 6)), ("embedding", (100,))):
        reduced = profile.tensor(name)
        assert isinstance(reduced, ReducedProfile) and reduced.row_shape == shape
        assert np.asarray(reduced.sample).shape == (250, REDUCED_DIMS)


def test_reduce_applies_the_projection_the_reference_rows_went_through():
    arrays = mixed_arrays(rows=80)
    profile = build_profile(arrays, max_rows=80)  # every row is sampled, in order
    np.testing.assert_array_equal(profile.reduce("image", arrays["image"]), np.asarray(profile.tensor("image").sample))


def test_projection_is_fixed_by_the_seed():
    arrays = mixed_arrays(rows=50)
    same = build_profile(arrays, seed=3), build_profile(arrays, seed=3)
    other = build_profile(arrays, seed=4)
    assert same[0] == same[1]
    assert not np.allclose(same[0].reduce("embedding", arrays["embedding"]), other.reduce("embedding", arrays["embedding"]))


def test_json_round_trip_is_exact():
    profile = build_profile(mixed_arrays(), max_rows=200)
    restored = Profile.from_json(profile.to_json())
    assert restored == profile
    arrays = mixed_arrays(rows=10, seed=9)
    np.testing.assert_array_equal(restored.reduce("image", arrays["image"]), profile.reduce("image", arrays["image"]))


def test_from_json_rejects_text_that_is_not_a_profile():
    with pytest.raises(InvalidInput, match="leanserve-profile"):
        Profile.from_json('{"format": "something-else", "version": 1, "tensors": []}')
    with pytest.raises(InvalidInput, match="leanserve-profile"):
        Profile.from_json("not json")


def test_build_profile_rejects_arrays_without_rows_or_numbers():
    with pytest.raises(InvalidInput, match="'empty'"):
        build_profile({"empty": np.zeros((0, 3))})
    with pytest.raises(InvalidInput, match="'text'.*numeric"):
        build_profile({"text": np.array(["a", "b"])})


def test_reduce_rejects_tabular_tensors_wrong_shapes_and_unknown_names():
    profile = build_profile(mixed_arrays(rows=40))
    with pytest.raises(InvalidInput, match="'table' is profiled per column"):
        profile.reduce("table", np.zeros((2, 3)))
    with pytest.raises(InvalidInput, match=r"'image': expected rows of shape \[1, 6, 6\]"):
        profile.reduce("image", np.zeros((2, 6, 6)))
    with pytest.raises(InvalidInput, match="unknown tensor 'nope'.*table, label, image, embedding"):
        profile.reduce("nope", np.zeros((2, 3)))
