"""Drift detectors: is a window of live rows still distributed like the version's reference profile?

Per tabular column: KS (``scipy.stats.ks_2samp``) and PSI for numeric columns, chi-square
(``scipy.stats.chi2_contingency``) for categorical ones. Per reduced tensor (images, sequences,
embeddings): MMD with an RBF kernel and a permutation test. ``detect`` runs them all on a window and,
because a window tests many columns at once, applies the Benjamini-Hochberg correction
(``scipy.stats.false_discovery_control``) across all its p-values so that false alarms stay near the
configured level however many columns a model has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from leanserve.errors import InvalidInput
from leanserve.monitor.profile import (
    CategoricalFeature,
    NumericFeature,
    Profile,
    ReducedProfile,
    TabularProfile,
    TensorProfile,
    as_float64,
    bin_index,
)

PSI_FLOOR = 1e-4  # bin share used in place of 0, so an empty bin adds a large but finite term
MMD_MAX_LIVE_ROWS = 1000  # the kernel matrix is (reference + live rows)^2; a larger window is subsampled
MMD_SEED = 0
MMD_PERMUTATION_BLOCK = 250  # permutations evaluated per matrix product: bounds memory to rows x 250
MMD_ENOUGH_EXCEEDANCES = 20  # stop permuting once this many relabellings reach the observed MMD


@dataclass(frozen=True)
class DriftConfig:
    """When a window counts as drifted.

    ``p_value`` is the significance level of KS, chi-square and MMD (after the Benjamini-Hochberg
    correction across the window when ``fdr``); ``psi_threshold`` the PSI above which a column
    drifted (0.1 is usually read as "moderate", 0.2 as "significant"). PSI votes only from
    ``psi_min_rows`` rows up: with fewer, its sampling noise alone approaches 0.2 (about 0.18 on
    average at 50 rows with 10 bins). Windows under ``min_rows`` rows are not judged at all.
    ``mmd_permutations`` is a minimum: ``detect`` uses more when the window has so many tests that a
    coarser permutation p-value could never pass the correction (see ``mmd_permutations_needed``).
    """

    psi_threshold: float = 0.2
    p_value: float = 0.01
    fdr: bool = True
    mmd_permutations: int = 200
    min_rows: int = 50
    psi_min_rows: int = 200

    def __post_init__(self) -> None:
        if not 0.0 < self.p_value < 1.0:
            raise InvalidInput(f"DriftConfig.p_value must be between 0 and 1, got {self.p_value}")
        if self.psi_threshold <= 0.0:
            raise InvalidInput(f"DriftConfig.psi_threshold must be positive, got {self.psi_threshold}")
        if self.mmd_permutations < 1 or self.min_rows < 2 or self.psi_min_rows < 1:
            raise InvalidInput("DriftConfig needs mmd_permutations >= 1, min_rows >= 2 and psi_min_rows >= 1")


@dataclass(frozen=True)
class FeatureDrift:
    """One detector's verdict on one feature (a column, or ``"*"`` for a whole reduced tensor).

    ``p_value`` is Benjamini-Hochberg adjusted when the config asks for it (compare it with
    ``DriftConfig.p_value`` directly); it is None for PSI, which has a threshold instead.
    """

    tensor: str
    feature: str
    method: str  # "ks", "psi", "chi2" or "mmd"
    statistic: float
    p_value: float | None
    drifted: bool


@dataclass(frozen=True)
class TensorDrift:
    """Summary for one tensor of the window: how many tests ran and which features drifted."""

    tensor: str
    tests: int
    drifted_features: tuple[str, ...]

    @property
    def drifted(self) -> bool:
        return bool(self.drifted_features)


@dataclass(frozen=True)
class DriftReport:
    """The verdict on a window; ``note`` says why nothing was judged (e.g. not enough rows)."""

    rows: int
    features: tuple[FeatureDrift, ...]
    tensors: tuple[TensorDrift, ...]
    note: str = ""

    @property
    def drifted(self) -> bool:
        return any(t.drifted for t in self.tensors)


def psi(reference_edges: Sequence[float], reference_fractions: Sequence[float], live_values: np.ndarray) -> float:
    """Population stability index of ``live_values`` against reference bins.

    ``reference_edges`` are the interior bin edges (see ``profile.NumericFeature``) and
    ``reference_fractions`` the reference share of each of the ``len(edges) + 1`` bins. Non-finite
    live values are ignored. Raises InvalidInput if the lengths disagree or no live value is finite.
    """
    # Written by hand: a two-line formula that SciPy lacks and the PSI packages on PyPI wrap in
    # DataFrame-shaped APIs with their own binning; ours must use the profile's stored bins.
    edges = np.asarray(reference_edges, dtype=np.float64)
    expected = np.asarray(reference_fractions, dtype=np.float64)
    if len(expected) != len(edges) + 1:
        raise InvalidInput(f"PSI needs one more reference fraction than edges, got {len(expected)} and {len(edges)}")
    live = _finite(live_values)
    actual = np.bincount(bin_index(edges, live), minlength=len(expected)) / len(live)
    expected, actual = np.maximum(expected, PSI_FLOOR), np.maximum(actual, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks(reference_sample: np.ndarray, live_values: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``): returns (statistic, p_value).

    Non-finite values are ignored; raises InvalidInput if either side has no finite value.
    """
    result = stats.ks_2samp(_finite(reference_sample), _finite(live_values))
    return float(result.statistic), float(result.pvalue)


def chi_square(reference_freqs: Mapping[int, int], live_values: np.ndarray) -> tuple[float, float]:
    """Chi-square test that live categories are distributed like the reference counts.

    ``reference_freqs`` maps each category to its reference count. The two samples are compared as a
    2 x k contingency table (``scipy.stats.chi2_contingency``). A live value the reference never
    saw (a new category) gives p_value 0: a value outside the known domain is a change of the data,
    not a sampling fluctuation. Returns (statistic, p_value); raises InvalidInput without live values.
    """
    live = _finite(live_values)
    seen, live_counts = np.unique(live, return_counts=True)
    live_freqs = dict(zip(seen.tolist(), live_counts.tolist(), strict=True))
    ref = {float(c): int(n) for c, n in reference_freqs.items() if n > 0}
    categories = sorted(set(ref) | set(live_freqs))
    unseen = any(c not in ref for c in live_freqs)
    if len(categories) < 2:
        return 0.0, 1.0
    table = np.array([[ref.get(c, 0) for c in categories], [live_freqs.get(c, 0) for c in categories]])
    result = stats.chi2_contingency(table)
    return float(result.statistic), 0.0 if unseen else float(result.pvalue)


def mmd(reference_rows: np.ndarray, live_rows: np.ndarray, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Maximum mean discrepancy between two sets of rows, with a permutation test.

    Takes 2-D arrays with the same number of columns (rows with non-finite values are dropped) and
    returns (MMD^2, p_value): the biased MMD^2 estimate under an RBF kernel whose bandwidth is the
    median pairwise distance of the pooled rows, and ``(1 + r) / (1 + k)`` where ``r`` of ``k``
    seeded random relabellings reach it. ``k`` is ``permutations``, or fewer once
    ``MMD_ENOUGH_EXCEEDANCES`` relabellings have reached it (the answer is "not significant" by then;
    Besag and Clifford's sequential test). Raises InvalidInput for mismatched shapes or fewer than
    two rows on either side.
    """
    # Written by hand: no well-kept library offers a kernel two-sample test on plain NumPy arrays
    # (alibi-detect and torch-two-sample pull in TensorFlow or PyTorch and their own data types).
    x, y = _rows(reference_rows, "reference"), _rows(live_rows, "live")
    if x.shape[1] != y.shape[1]:
        raise InvalidInput(f"MMD needs rows of equal width, got {x.shape[1]} and {y.shape[1]} columns")
    if permutations < 1:
        raise InvalidInput(f"MMD needs at least one permutation, got {permutations}")
    kernel = _rbf_kernel(np.vstack([x, y]))
    # with weights 1/n on reference rows and -1/m on live rows, w K w is the biased MMD^2
    weights = np.concatenate([np.full(len(x), 1.0 / len(x)), np.full(len(y), -1.0 / len(y))])
    observed = float(weights @ kernel @ weights)
    rng = np.random.default_rng(seed)
    reached = done = 0
    while done < permutations and reached < MMD_ENOUGH_EXCEEDANCES:
        block = min(MMD_PERMUTATION_BLOCK, permutations - done)
        shuffled = rng.permuted(np.repeat(weights[:, None], block, axis=1), axis=0)
        null = np.einsum("ip,ip->p", shuffled, kernel @ shuffled)
        reached += int(np.sum(null >= observed - 1e-12))  # the tolerance keeps rounding ties counted
        done += block
    return observed, (1 + reached) / (1 + done)


def mmd_permutations_needed(tests: int, config: DriftConfig) -> int:
    """Permutations for MMD's p-value to be able to pass ``config`` among ``tests`` p-values.

    A permutation p-value is at least 1 / (permutations + 1); Benjamini-Hochberg compares the
    smallest of ``tests`` p-values with ``p_value / tests``. Returns at least ``mmd_permutations``.
    """
    floor = tests / config.p_value if config.fdr else 1.0 / config.p_value
    return max(config.mmd_permutations, math.ceil(floor))


def detect(profile: Profile, live: Mapping[str, np.ndarray], config: DriftConfig = DriftConfig()) -> DriftReport:
    """Compare a window of live rows with the reference profile, tensor by tensor.

    ``live`` maps tensor names (a subset of the profile's; absent ones are skipped) to arrays with a
    leading batch axis. Returns a DriftReport; a window under ``config.min_rows`` rows gives a report
    with a note, no features and ``drifted`` False. Raises InvalidInput for a tensor the profile does
    not know, a row shape that differs from the reference's, or non-numeric data.
    """
    arrays = {name: _checked(profile, name, array) for name, array in live.items()}
    rows = min((len(a) for a in arrays.values()), default=0)
    if rows < config.min_rows:
        note = f"not enough rows: the window has {rows}, drift detection needs at least {config.min_rows} (min_rows)"
        return DriftReport(rows, (), (), note)
    tested = [t for t in profile.tensors if t.name in arrays]
    tests = sum(len(t.features) if isinstance(t, TabularProfile) else 1 for t in tested)
    permutations = mmd_permutations_needed(tests, config)
    results = [r for t in tested for r in _tensor_tests(profile, t, arrays[t.name], config, permutations)]
    results = _judge_p_values(results, config)
    return DriftReport(rows, tuple(results), tuple(_summary(t.name, results) for t in tested))


def _checked(profile: Profile, name: str, array: np.ndarray) -> np.ndarray:
    reference = profile.tensor(name)
    array = np.asarray(array)
    if array.ndim < 1 or tuple(array.shape[1:]) != reference.row_shape:
        count = f" ({len(reference.features)} features)" if isinstance(reference, TabularProfile) else ""
        raise InvalidInput(
            f"tensor {name!r}: expected rows of shape {list(reference.row_shape)}{count} after the batch axis, "
            f"got an array of shape {list(array.shape)}"
        )
    return as_float64(name, array)


def _tensor_tests(profile: Profile, t: TensorProfile, array: np.ndarray, config: DriftConfig,
                  permutations: int) -> list[FeatureDrift]:
    if isinstance(t, ReducedProfile):
        reduced = profile.reduce(t.name, array)
        if len(reduced) > MMD_MAX_LIVE_ROWS:
            pick = np.random.default_rng(MMD_SEED).choice(len(reduced), MMD_MAX_LIVE_ROWS, replace=False)
            reduced = reduced[np.sort(pick)]
        stat, p = mmd(np.asarray(t.sample), reduced, permutations, MMD_SEED)
        return [FeatureDrift(t.name, "*", "mmd", stat, p, False)]
    columns = array.reshape(len(array), -1)
    results: list[FeatureDrift] = []
    for j, feature in enumerate(t.features):
        column = columns[:, j][np.isfinite(columns[:, j])]
        if len(column) == 0:
            continue  # nothing to judge: a column the clients left empty is an input problem, not drift
        results.extend(_column_tests(t.name, feature, column, config))
    return results


def _column_tests(tensor: str, feature: CategoricalFeature | NumericFeature, column: np.ndarray,
                  config: DriftConfig) -> list[FeatureDrift]:
    if isinstance(feature, CategoricalFeature):
        stat, p = chi_square(feature.frequencies, column)
        return [FeatureDrift(tensor, feature.name, "chi2", stat, p, False)]
    ks_stat, ks_p = ks(np.asarray(feature.sample), column)
    psi_value = psi(feature.edges, feature.fractions, column)
    psi_drifted = len(column) >= config.psi_min_rows and psi_value >= config.psi_threshold
    return [
        FeatureDrift(tensor, feature.name, "ks", ks_stat, ks_p, False),
        FeatureDrift(tensor, feature.name, "psi", psi_value, None, psi_drifted),
    ]


def _judge_p_values(results: list[FeatureDrift], config: DriftConfig) -> list[FeatureDrift]:
    tested = [i for i, r in enumerate(results) if r.p_value is not None]
    if not tested:
        return results
    raw = np.array([results[i].p_value for i in tested], dtype=np.float64)
    adjusted = stats.false_discovery_control(raw, method="bh") if config.fdr else raw
    judged = list(results)
    for i, p in zip(tested, adjusted, strict=True):
        judged[i] = replace(results[i], p_value=float(p), drifted=bool(p <= config.p_value))
    return judged


def _summary(tensor: str, results: list[FeatureDrift]) -> TensorDrift:
    own = [r for r in results if r.tensor == tensor]
    drifted = tuple(dict.fromkeys(r.feature for r in own if r.drifted))
    return TensorDrift(tensor, len(own), drifted)


def _rbf_kernel(z: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", z, z)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (z @ z.T), 0.0)
    # median heuristic: the bandwidth is the median distance between distinct pooled rows
    median = float(np.median(squared[np.triu_indices(len(z), k=1)]))
    return np.exp(-squared / (2.0 * (median if median > 0 else 1.0)))


def _finite(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if len(flat) == 0:
        raise InvalidInput("a drift test needs at least one finite value on each side")
    return flat


def _rows(rows: np.ndarray, side: str) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    if array.ndim != 2:
        raise InvalidInput(f"MMD needs 2-D {side} rows (rows x columns), got shape {list(array.shape)}")
    array = array[np.isfinite(array).all(axis=1)]
    if len(array) < 2:
        raise InvalidInput(f"MMD needs at least 2 finite {side} rows, got {len(array)}")
    return array
