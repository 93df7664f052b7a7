"""Global importance of a version's input features, accumulated from explanations of live traffic, and
its drift: how far the share of attribution each feature takes has moved since the version started.

Each explanation adds one vector: the absolute attributions summed over its rows, normalised to sum
to one, so a request weighs the same whatever its output scale. The first ``reference_samples``
vectors fix the reference; after that, attribution drift is the total variation distance between the
reference's mean vector and the mean of the latest ``window_samples`` (0: the same features carry the
decision in the same shares; 1: entirely different features do).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HISTORY_POINTS = 300


@dataclass
class VersionImportance:
    """Running importance of one version's input, as explained by one method."""

    input: str
    method: str
    row_shape: tuple[int, ...]
    reference_samples: int
    window_samples: int
    total: np.ndarray = field(init=False)
    reference: np.ndarray = field(init=False)
    samples: int = 0
    window: collections.deque = field(init=False)
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY_POINTS))

    def __post_init__(self) -> None:
        size = int(np.prod(self.row_shape)) if self.row_shape else 1
        self.total = np.zeros(size)
        self.reference = np.zeros(size)
        self.window = collections.deque(maxlen=self.window_samples)

    def add(self, values: np.ndarray) -> float | None:
        """Add one explanation (``(rows, *row_shape)``); returns the drift after it, None while there is
        no reference or no full window yet."""
        weights = np.abs(values.astype(np.float64)).reshape(len(values), -1).sum(axis=0)
        mass = weights.sum()
        if not np.isfinite(mass) or mass <= 0:
            return self.drift  # an all-zero explanation (input equal to the baseline) says nothing
        share = weights / mass
        self.samples += 1
        self.total += share
        if self.samples <= self.reference_samples:
            self.reference += share
            return None
        self.window.append(share)
        drift = self.drift
        if drift is not None:
            self.history.append({"t": round(time.time(), 1), "drift": round(drift, 4)})
        return drift

    @property
    def drift(self) -> float | None:
        if self.samples < self.reference_samples or len(self.window) < self.window_samples:
            return None
        reference = self.reference / self.reference_samples
        latest = np.mean(self.window, axis=0)
        return float(0.5 * np.abs(reference - latest).sum())

    def summary(self, threshold: float) -> dict[str, Any]:
        """JSON-ready picture for the dashboard: mean shares (flattened, row-major over ``shape``),
        the top features, drift and its history."""
        mean = self.total / max(1, self.samples)
        drift = self.drift
        top = np.argsort(mean)[::-1][:10]
        return {
            "input": self.input, "method": self.method, "shape": list(self.row_shape), "samples": self.samples,
            "importance": [round(float(v), 5) for v in mean],
            "top_features": [{"feature": int(i), "share": round(float(mean[i]), 4)} for i in top if mean[i] > 0],
            "drift": None if drift is None else round(drift, 4),
            "drifted": drift is not None and drift > threshold,
            "reference_samples": min(self.samples, self.reference_samples),
            "history": list(self.history)[-120:],
        }
