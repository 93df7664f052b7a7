"""Drift detectors: each fires on drift built on purpose and stays quiet on same-distribution windows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from leanserve.errors import InvalidInput
from leanserve.monitor.drift import (
    DriftConfig,
    chi_square,
    detect,
    ks,
    mmd,
    mmd_permutations_needed,
    psi,
)
from leanserve.monitor.profile import build_profile

FEATURES = 10


def tabular_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Ten columns of differently shaped distributions, none of them categorical."""
    columns = [
        rng.normal(0.0, 1.0, rows), rng.normal(50.0, 10.0, rows), rng.lognormal(0.0, 1.0, rows),
        rng.exponential(2.0, rows), rng.uniform(-1.0, 1.0, rows), rng.standard_t(5, rows),
        rng.gamma(2.0, 3.0, rows), rng.beta(2.0, 5.0, rows), rng.normal(-3.0, 0.1, rows), rng.laplace(0.0, 1.0, rows),
    ]
    return np.column_stack(columns)


@pytest.fixture(scope="module")
def tabular_profile():
    return build_profile({"x": tabular_rows(np.random.default_rng(0), 5000)}, max_rows=2000)


@pytest.fixture(scope="module")
def digits():
    """The 8x8 scikit-learn digits, shuffled once: disjoint slices are same-distribution samples."""
    images = load_digits().images.astype(np.float32)
    return images[np.random.default_rng(0).permutation(len(images))]


def drifted(report, method: str) -> set[str]:
    return {f.feature for f in report.features if f.method == method and f.drifted}


def statistics(report, method: str) -> dict[str, float]:
    return {f.feature: round(f.statistic, 3) for f in report.features if f.method == method}


def test_ks_and_psi_fire_on_the_shifted_and_rescaled_columns_only(tabular_profile):
    live = tabular_rows(np.random.default_rng(1), 500)
    live[:, 0] += 1.0  # mean shifted by one standard deviation
    live[:, 1] = 50.0 + (live[:, 1] - 50.0) * 2.0  # standard deviation doubled, mean kept
    report = detect(tabular_profile, {"x": live})
    assert drifted(report, "ks") == {"0", "1"}, statistics(report, "ks")
    assert drifted(report, "psi") == {"0", "1"}, statistics(report, "psi")
    assert report.drifted and report.tensors[0].drifted_features == ("0", "1")


def test_a_same_distribution_window_is_not_drifted(tabular_profile):
    report = detect(tabular_profile, {"x": tabular_rows(np.random.default_rng(2), 500)})
    assert not report.drifted
    assert max(statistics(report, "psi").values()) < 0.1  # sampling noise alone: about 0.02 at 500 rows
    assert len(report.features) == 2 * FEATURES and report.tensors[0].tests == 2 * FEATURES


def test_false_alarm_rate_over_many_same_distribution_windows_stays_near_the_level(tabular_profile):
    config = DriftConfig(p_value=0.01, fdr=True)
    rng = np.random.default_rng(3)
    flagged = [detect(tabular_profile, {"x": tabular_rows(rng, 200)}, config).drifted for _ in range(300)]
    rate = float(np.mean(flagged))
    assert rate <= 3 * config.p_value, f"{rate:.3f} of windows flagged at p={config.p_value}"


def test_without_fdr_false_alarms_grow_with_the_number_of_columns(tabular_profile):
    # ten uncorrected tests at 0.01 flag about 1 - 0.99**10 ~ 10% of quiet windows: why fdr is on by default
    config = DriftConfig(p_value=0.01, fdr=False)
    rng = np.random.default_rng(4)
    flagged = [detect(tabular_profile, {"x": tabular_rows(rng, 200)}, config).drifted for _ in range(300)]
    assert 0.04 <= float(np.mean(flagged)) <= 0.2


def test_psi_does_not_vote_on_windows_under_psi_min_rows(tabular_profile):
    live = tabular_rows(np.random.default_rng(5), 60)
    live[:, 0] += 3.0
    report = detect(tabular_profile, {"x": live}, DriftConfig(psi_min_rows=200))
    assert statistics(report, "psi")["0"] > 1.0 and drifted(report, "psi") == set()
    assert drifted(report, "ks") == {"0"}


def categorical_profile():
    rng = np.random.default_rng(6)
    table = np.column_stack([rng.choice(4, 3000, p=[0.4, 0.3, 0.2, 0.1]), rng.normal(size=3000)])
    return build_profile({"t": table}), rng


def test_chi_square_fires_on_a_category_the_reference_never_saw():
    profile, rng = categorical_profile()
    live = np.column_stack([rng.choice(4, 300, p=[0.4, 0.3, 0.2, 0.1]), rng.normal(size=300)])
    live[:3, 0] = 7  # three rows of a new category among 300
    report = detect(profile, {"t": live})
    assert drifted(report, "chi2") == {"0"} and drifted(report, "ks") == set()


def test_chi_square_fires_on_changed_category_shares_and_not_on_kept_ones():
    profile, rng = categorical_profile()
    kept = np.column_stack([rng.choice(4, 300, p=[0.4, 0.3, 0.2, 0.1]), rng.normal(size=300)])
    changed = np.column_stack([rng.choice(4, 300, p=[0.1, 0.2, 0.3, 0.4]), rng.normal(size=300)])
    assert not detect(profile, {"t": kept}).drifted
    assert drifted(detect(profile, {"t": changed}), "chi2") == {"0"}


def test_mmd_fires_on_rotated_digits(digits):
    profile = build_profile({"image": digits[:150]}, max_rows=150)
    report = detect(profile, {"image": np.rot90(digits[150:300], axes=(1, 2))}, DriftConfig())
    (result,) = report.features
    assert (result.method, result.feature) == ("mmd", "*")
    assert result.drifted and result.p_value <= 0.01, result


def test_mmd_is_quiet_on_a_disjoint_sample_of_upright_digits(digits):
    profile = build_profile({"image": digits[:150]}, max_rows=150)
    report = detect(profile, {"image": digits[300:450]}, DriftConfig())
    (result,) = report.features
    assert not result.drifted and result.p_value > 0.05, result


def test_mmd_on_images_still_fires_beside_many_quiet_columns(digits):
    # with 11 tests, Benjamini-Hochberg needs p <= 0.01 / 11: finer than 200 permutations can show (1 / 201)
    rng = np.random.default_rng(7)
    profile = build_profile({"image": digits[:150], "x": tabular_rows(rng, 2000)}, max_rows=150)
    live = {"image": np.rot90(digits[150:300], axes=(1, 2)), "x": tabular_rows(rng, 150)}
    report = detect(profile, live, DriftConfig())
    assert drifted(report, "mmd") == {"*"} and drifted(report, "ks") == set()
    assert mmd_permutations_needed(11, DriftConfig()) == 1100


def test_detectors_agree_with_known_cases():
    rng = np.random.default_rng(8)
    same, shifted = rng.normal(size=1000), rng.normal(1.0, 1.0, 1000)
    assert psi([0.0], [0.5, 0.5], same) < 0.01 and psi([0.0], [0.5, 0.5], shifted) > 0.5
    assert ks(same, rng.normal(size=500))[1] > 0.01 and ks(same, shifted)[1] < 1e-10
    assert chi_square({0: 500, 1: 500}, np.array([0, 1] * 50)) == (0.0, 1.0)
    assert chi_square({0: 500, 1: 500}, np.array([0, 1] * 50 + [2]))[1] == 0.0
    rows = rng.normal(size=(100, 4))
    assert mmd(rows, rng.normal(size=(100, 4)), 100)[1] > 0.05 and mmd(rows, rng.normal(1.0, 1.0, (100, 4)), 100)[1] < 0.02


def test_mmd_is_reproducible_for_a_seed():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(80, 4)), rng.normal(0.3, 1.0, size=(80, 4))
    assert mmd(x, y, 100, seed=1) == mmd(x, y, 100, seed=1)
    assert mmd(x, x + 0.0, 100)[1] == 1.0


def test_a_window_under_min_rows_is_reported_not_judged(tabular_profile):
    live = tabular_rows(np.random.default_rng(10), 20) + 100.0
    report = detect(tabular_profile, {"x": live}, DriftConfig(min_rows=50))
    assert not report.drifted and report.features == () and report.rows == 20
    assert "not enough rows" in report.note and "50" in report.note


def test_an_empty_window_is_reported_not_judged(tabular_profile):
    report = detect(tabular_profile, {})
    assert not report.drifted and "not enough rows" in report.note


def test_unknown_tensor_is_invalid_input_naming_it_and_the_known_ones(tabular_profile):
    with pytest.raises(InvalidInput, match="unknown tensor 'y'.*: the reference profile has x"):
        detect(tabular_profile, {"y": np.zeros((100, FEATURES))})


def test_wrong_feature_count_is_invalid_input_saying_what_was_expected(tabular_profile):
    with pytest.raises(InvalidInput, match=r"'x': expected rows of shape \[10\] \(10 features\).*\[100, 9\]"):
        detect(tabular_profile, {"x": np.zeros((100, 9))})


def test_non_numeric_window_is_invalid_input(tabular_profile):
    with pytest.raises(InvalidInput, match="'x'.*numeric"):
        detect(tabular_profile, {"x": np.full((100, FEATURES), "a")})


def test_config_rejects_levels_outside_zero_and_one():
    with pytest.raises(InvalidInput, match="p_value"):
        DriftConfig(p_value=1.5)
