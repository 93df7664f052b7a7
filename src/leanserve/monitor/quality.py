"""Quality from delayed labels: rolling accuracy (classification) or error (regression) per version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Quality:
    """One version's quality over its newest labelled samples."""

    version: int
    metric: str  # "accuracy" or "mae"
    value: float
    samples: int


def rolling_quality(rows: Sequence[dict[str, Any]]) -> list[Quality]:
    """Per version: accuracy of the first output's arg-max against integer labels, else mean absolute error."""
    by_version: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_version.setdefault(row["version"], []).append(row)
    result = []
    for version, items in sorted(by_version.items()):
        labels = np.array([np.asarray(r["label"]).reshape(-1)[0] for r in items])
        scores = [next(iter(r["outputs"].values())) for r in items]
        if np.issubdtype(labels.dtype, np.integer):
            predicted = np.array([int(np.asarray(s).reshape(-1, np.asarray(s).shape[-1])[0].argmax()) for s in scores])
            result.append(Quality(version, "accuracy", float((predicted == labels).mean()), len(items)))
        else:
            predicted = np.array([float(np.asarray(s).reshape(-1)[0]) for s in scores])
            result.append(Quality(version, "mae", float(np.abs(predicted - labels).mean()), len(items)))
    return result
