"""Bias across groups from delayed labels: per-group accuracy and positive rate, and their largest gaps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GroupStats:
    group: str
    samples: int
    accuracy: float
    positive_rate: float  # share of predictions of class 1 (the positive class)


@dataclass(frozen=True)
class BiasReport:
    """Per-group figures of one version and the largest gap between any two groups."""

    version: int
    groups: list[GroupStats] = field(default_factory=list)
    accuracy_gap: float = 0.0
    positive_rate_gap: float = 0.0


def bias_by_group(rows: Sequence[dict[str, Any]], min_samples: int = 10) -> list[BiasReport]:
    """Per version: accuracy and positive rate of each group (request parameter ``group``) with at least
    ``min_samples`` labelled classification rows, and the largest gaps between groups."""
    by_version: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for row in rows:
        label = np.asarray(row["label"]).reshape(-1)
        if row.get("group") is None or not np.issubdtype(label.dtype, np.integer):
            continue
        scores = np.asarray(next(iter(row["outputs"].values())))
        predicted = int(scores.reshape(-1, scores.shape[-1])[0].argmax())
        by_version.setdefault(row["version"], {}).setdefault(row["group"], []).append((predicted, int(label[0])))
    reports = []
    for version, groups in sorted(by_version.items()):
        stats = [GroupStats(g, len(p), float(np.mean([a == b for a, b in p])), float(np.mean([a == 1 for a, _ in p])))
                 for g, p in sorted(groups.items()) if len(p) >= min_samples]
        if len(stats) < 2:
            reports.append(BiasReport(version, stats))
            continue
        acc, pos = [s.accuracy for s in stats], [s.positive_rate for s in stats]
        reports.append(BiasReport(version, stats, max(acc) - min(acc), max(pos) - min(pos)))
    return reports
