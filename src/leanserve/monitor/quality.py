"""Quality from delayed labels: rolling accuracy (classification) or error (regression) per version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QualityCounts:
    """How many of a version's ``labelled`` samples it predicted correctly: what a test of two
    accuracies needs (an accuracy alone does not say how much evidence is behind it)."""

    correct: int
    labelled: int

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.labelled:
            raise ValueError(f"expected 0 <= correct <= labelled, got {self.correct} of {self.labelled}")

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else 0.0


@dataclass(frozen=True)
class Quality:
    """One version's quality over its newest labelled samples; ``counts`` only for accuracy."""

    version: int
    metric: str  # "accuracy" or "mae"
    value: float
    samples: int
    counts: QualityCounts | None = None


def judged_output(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The output a version's quality is judged on: its first numeric output (a text classifier's
    ``probabilities``, not the label names before them), else its first output."""
    arrays = [np.asarray(a) for a in outputs.values()]
    return next((a for a in arrays if np.issubdtype(a.dtype, np.number)), arrays[0])


def rolling_quality(rows: Sequence[dict[str, Any]]) -> list[Quality]:
    """Per version: accuracy of the judged output's arg-max (``judged_output``) against integer labels
    (with the counts behind it), else mean absolute error."""
    by_version: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_version.setdefault(row["version"], []).append(row)
    result = []
    for version, items in sorted(by_version.items()):
        labels = np.array([np.asarray(r["label"]).reshape(-1)[0] for r in items])
        scores = [judged_output(r["outputs"]) for r in items]
        if np.issubdtype(labels.dtype, np.integer):
            predicted = np.array([int(np.asarray(s).reshape(-1, np.asarray(s).shape[-1])[0].argmax()) for s in scores])
            counts = QualityCounts(int((predicted == labels).sum()), len(items))
            result.append(Quality(version, "accuracy", counts.accuracy, len(items), counts))
        else:
            predicted = np.array([float(np.asarray(s).reshape(-1)[0]) for s in scores])
            result.append(Quality(version, "mae", float(np.abs(predicted - labels).mean()), len(items)))
    return result


def accuracy_counts(rows: Sequence[dict[str, Any]]) -> dict[int, QualityCounts]:
    """Version -> correct/labelled counts of the versions whose labels are classes (regression versions
    are left out: their error has no counts to test)."""
    return {q.version: q.counts for q in rolling_quality(rows) if q.counts is not None}
