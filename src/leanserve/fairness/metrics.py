"""Fairness figures from delayed labels, computed with Fairlearn's metrics: per group the selection
rate, true and false positive rates and accuracy, and their largest gaps (demographic parity
difference, equalized odds difference).

Binary decisions only: a row's decision is the arg-max of its first output (class 1 is the positive
class), as the monitor's accuracy reads it; rows whose first output has other than two classes, or
whose labels are not 0/1, are left out. Fairlearn (``pip install 'leanserve[fairness]'``) is
imported only when figures are computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_GROUPS = 20  # group names come from requests: bound the label values a server exports


@dataclass(frozen=True)
class GroupRates:
    """One group's figures; a rate is None when the group has no row to compute it on (e.g. no
    positive label for the true positive rate)."""

    group: str
    samples: int
    selection_rate: float
    true_positive_rate: float | None
    false_positive_rate: float | None
    accuracy: float


@dataclass(frozen=True)
class FairnessReport:
    """Per-group rates of one set of decisions and their largest gaps between groups (None with fewer
    than two groups)."""

    groups: list[GroupRates] = field(default_factory=list)
    demographic_parity_difference: float | None = None
    equalized_odds_difference: float | None = None
    accuracy: float | None = None
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.__dict__ for g in self.groups], "samples": self.samples, "accuracy": self.accuracy,
                "demographic_parity_difference": self.demographic_parity_difference,
                "equalized_odds_difference": self.equalized_odds_difference}


def fairness_report(y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence[str]) -> FairnessReport:
    """Fairlearn's MetricFrame over ``groups`` of binary labels and decisions (0/1 arrays)."""
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    groups = np.asarray([str(g) for g in groups])
    if len(y_true) == 0:
        return FairnessReport()
    with warnings.catch_warnings():  # a group without positives (or negatives) has no TPR (FPR): None below
        warnings.simplefilter("ignore")
        frame = MetricFrame(metrics={"samples": count, "selection_rate": selection_rate,
                                     "true_positive_rate": true_positive_rate, "false_positive_rate": false_positive_rate,
                                     "accuracy": accuracy_score},
                            y_true=y_true, y_pred=y_pred, sensitive_features=groups)
        by_group = frame.by_group
        rates = []
        for group in by_group.index:
            mine = groups == group
            rates.append(GroupRates(
                str(group), int(by_group.loc[group, "samples"]), float(by_group.loc[group, "selection_rate"]),
                float(by_group.loc[group, "true_positive_rate"]) if (y_true[mine] == 1).any() else None,
                float(by_group.loc[group, "false_positive_rate"]) if (y_true[mine] == 0).any() else None,
                float(by_group.loc[group, "accuracy"])))
        several = len(rates) > 1
        dp = float(demographic_parity_difference(y_true, y_pred, sensitive_features=groups)) if several else None
        eo = float(equalized_odds_difference(y_true, y_pred, sensitive_features=groups)) if several else None
    return FairnessReport(rates, _finite(dp), _finite(eo), float(accuracy_score(y_true, y_pred)), len(y_true))


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else value


def labelled_decisions(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, decisions and groups of the logged rows usable for fairness: a group, a 0/1 label and a
    first output of two class scores."""
    y_true, y_pred, groups = [], [], []
    for row in rows:
        label = np.asarray(row["label"]).reshape(-1)
        if row.get("group") is None or not label.size or not np.issubdtype(label.dtype, np.integer) or label[0] not in (0, 1):
            continue
        scores = np.asarray(next(iter(row["outputs"].values())))
        if scores.ndim == 0 or scores.shape[-1] != 2:
            continue
        y_true.append(int(label[0]))
        y_pred.append(int(scores.reshape(-1, 2)[0].argmax()))
        groups.append(str(row["group"]))
    return np.array(y_true, dtype=np.int64), np.array(y_pred, dtype=np.int64), groups


def fairness_by_version(rows: Sequence[dict[str, Any]], min_samples: int = 30) -> dict[int, FairnessReport]:
    """Per version, the fairness report of its labelled rows, over the (at most ``MAX_GROUPS`` largest)
    groups with at least ``min_samples`` rows."""
    by_version: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_version.setdefault(row["version"], []).append(row)
    reports = {}
    for version, items in sorted(by_version.items()):
        y_true, y_pred, groups = labelled_decisions(items)
        names, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True) if groups else ([], [])
        kept = {n for n, c in sorted(zip(names, counts), key=lambda p: -p[1])[:MAX_GROUPS] if c >= min_samples}
        mask = np.array([g in kept for g in groups], dtype=bool)
        if mask.any():
            reports[version] = fairness_report(y_true[mask], y_pred[mask], [g for g, m in zip(groups, mask) if m])
    return reports


def available() -> bool:
    """Whether Fairlearn is installed (the monitor skips fairness figures without it)."""
    import importlib.util

    return importlib.util.find_spec("fairlearn") is not None


def publish(metrics, model: str, version: int, report: FairnessReport) -> None:
    """Set the server's fairness gauges (``leanserve_fairness_gap``, ``leanserve_group_rate``) of one version."""
    labels = (model, str(version))
    for key in ("demographic_parity_difference", "equalized_odds_difference"):
        value = getattr(report, key)
        if value is not None:
            metrics.fairness_gap.labels(*labels, key).set(value)
    for group in report.groups:
        for key in ("selection_rate", "true_positive_rate", "false_positive_rate", "accuracy"):
            value = getattr(group, key)
            if value is not None:
                metrics.group_rate.labels(*labels, group.group, key).set(value)
