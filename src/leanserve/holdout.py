"""Held-out evaluation by design: split evaluation data into a part that chooses and a part that grades.

``optimize`` and ``edge`` pick a variant on the selection part and report its quality on the held-out
part, which the choice never saw; a figure measured on the data that chose it flatters the winner.

    split = split_holdout(data, holdout_fraction=0.3, seed=0)   # or given_holdout(data, holdout)
    choose_on(split.selection); report_on(split.holdout)
    manifest_metrics["holdout"] = split.info.to_dict()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput

LABELS = "labels"  # the key of the labels array in evaluation data (as in leanserve.measure)
MIN_PART_ROWS = 10  # fewer rows than this in either part and a quality figure is mostly noise


@dataclass(frozen=True)
class SplitInfo:
    """Where the two parts came from and how big they are.

    ``source`` is ``"split"`` (one data set cut in two by ``seed`` and ``holdout_fraction``) or
    ``"given"`` (the user passed a separate held-out set; seed and fraction are then None).
    """

    source: str
    selection_rows: int
    holdout_rows: int
    seed: int | None = None
    holdout_fraction: float | None = None
    stratified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for reports, e.g. ``selection 140 rows, held-out 60 rows (30% split, seed 0, by label)``."""
        how = ("given separately" if self.source == "given" else
               f"{self.holdout_fraction:.0%} split, seed {self.seed}{', by label' if self.stratified else ''}")
        return f"selection {self.selection_rows} rows, held-out {self.holdout_rows} rows ({how})"


@dataclass(frozen=True)
class Split:
    """Evaluation data in two disjoint parts: ``selection`` chooses, ``holdout`` reports."""

    selection: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    info: SplitInfo


def _rows(data: Mapping[str, np.ndarray], what: str) -> int:
    if not data:
        raise InvalidInput(f"{what}: expected at least one array, got none")
    counts = {name: len(np.asarray(a)) for name, a in data.items()}
    if len(set(counts.values())) != 1:
        raise InvalidInput(f"{what}: every array needs the same number of rows; got "
                           + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return next(iter(counts.values()))


def _is_classes(labels: np.ndarray | None) -> bool:
    """Integer (or boolean) labels, one per row, are classes; float labels are a regression target."""
    return labels is not None and labels.ndim == 1 and (labels.dtype.kind in "iub")


def _stratified_holdout_rows(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    # Written by hand, not sklearn's train_test_split: scikit-learn is not a core dependency, and a
    # per-class permutation is a few lines. Each class gets its share of ``total`` (largest remainder,
    # so the shares add up to it), and a class with two or more rows gives both parts at least one.
    classes, counts = np.unique(labels, return_counts=True)
    quota = total * counts / counts.sum()
    take = np.floor(quota).astype(int)
    by_remainder = np.lexsort((rng.random(len(classes)), -(quota - take)))
    take[by_remainder[: total - take.sum()]] += 1
    take = np.where(counts >= 2, np.clip(take, 1, counts - 1), take)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])


def split_holdout(data: Mapping[str, np.ndarray], holdout_fraction: float = 0.3, seed: int = 0) -> Split:
    """Split ``data`` (arrays of equal row count, optionally ``labels``) into selection and held-out parts.

    Rows are drawn by ``seed``; with class labels (integer ``labels``) each class is split in the same
    proportion. Row order within each part follows the original order. Raises InvalidInput when the
    fraction is not in (0, 1) or when either part would have fewer than ``MIN_PART_ROWS`` rows.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise InvalidInput(f"holdout_fraction: expected a number between 0 and 1 (exclusive), got {holdout_fraction}")
    n = _rows(data, "evaluation data")
    labels = np.asarray(data[LABELS]) if LABELS in data else None
    stratified = _is_classes(labels)
    expected_holdout = int(round(holdout_fraction * n))
    if min(expected_holdout, n - expected_holdout) < MIN_PART_ROWS:
        raise InvalidInput(
            f"evaluation data has {n} rows: a {holdout_fraction:.0%} held-out split gives {n - expected_holdout} "
            f"selection and {expected_holdout} held-out rows, and each part needs at least {MIN_PART_ROWS} "
            f"(give at least {_rows_needed(holdout_fraction)} rows, or a separate held-out file)")
    rng = np.random.default_rng(seed)
    if stratified:
        held = _stratified_holdout_rows(labels, expected_holdout, rng)
    else:
        held = rng.permutation(n)[:expected_holdout]
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    selection = {k: np.asarray(v)[~mask] for k, v in data.items()}
    holdout = {k: np.asarray(v)[mask] for k, v in data.items()}
    info = SplitInfo("split", int((~mask).sum()), int(mask.sum()), seed, holdout_fraction, stratified)
    if min(info.selection_rows, info.holdout_rows) < MIN_PART_ROWS:  # per-class rounding can shift a few rows
        raise InvalidInput(f"evaluation data has {n} rows: the split by label gives {info.selection_rows} selection "
                           f"and {info.holdout_rows} held-out rows; each part needs at least {MIN_PART_ROWS}")
    return Split(selection, holdout, info)


def _rows_needed(fraction: float) -> int:
    n = MIN_PART_ROWS
    while min(round(fraction * n), n - round(fraction * n)) < MIN_PART_ROWS:
        n += 1
    return n


def given_holdout(selection: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray]) -> Split:
    """A split from two separate data sets (``--holdout DATA``): all of ``selection`` chooses, all of
    ``holdout`` reports. Raises InvalidInput when their arrays differ or either has too few rows."""
    if set(selection) != set(holdout):
        raise InvalidInput(f"held-out data has arrays {sorted(holdout)}, the evaluation data {sorted(selection)}; "
                           "expected the same names")
    rows = _rows(selection, "evaluation data"), _rows(holdout, "held-out data")
    for what, count in zip(("evaluation", "held-out"), rows):
        if count < MIN_PART_ROWS:
            raise InvalidInput(f"{what} data has {count} rows; expected at least {MIN_PART_ROWS}")
    return Split(dict(selection), dict(holdout), SplitInfo("given", rows[0], rows[1]))
