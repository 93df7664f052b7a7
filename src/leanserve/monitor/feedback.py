"""Delayed labels on the server: join true labels to logged predictions by request id, and keep each
version's live quality (accuracy with the counts behind it, or mean absolute error) for the gauges, the
monitor and the rollout guard.

The live quality is kept incrementally: each accepted label updates its version's window of newest
labels, so a feedback call costs O(its labels) and never re-reads the log (it used to re-read up to
5,000 labelled rows per call: 8 clients sending one label each pushed infer p99 from 4 ms to 942 ms).
"""

from __future__ import annotations

import asyncio
import numbers
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput
from leanserve.monitor.quality import Quality, QualityCounts
from leanserve.monitor.store import Joined, PredictionLog

LABELLED_WINDOW = 5000  # newest labelled samples per version behind the live quality


@dataclass
class QualityWindow:
    """The newest ``size`` labels of one version, with running sums so that adding one is O(1).

    Accuracy (the arg-max of the judged output against the class index: see ``quality.judged_output``)
    while every label in the window is a class index, else the mean absolute error of its first value: the rule
    ``quality.rolling_quality`` applies to rows read from the log."""

    size: int = LABELLED_WINDOW
    entries: deque = field(default_factory=deque)  # (is_class, correct, abs_error) per label, oldest first
    correct: int = 0
    non_class: int = 0
    abs_error: float = 0.0

    def add(self, output: np.ndarray, label: Any) -> None:
        output = np.asarray(output)
        is_class = isinstance(label, numbers.Integral)
        correct = is_class and int(output.reshape(-1, output.shape[-1] if output.ndim else 1)[0].argmax()) == label
        entry = (is_class, correct, abs(float(output.reshape(-1)[0]) - float(label)))
        self.entries.append(entry)
        self._count(entry, 1)
        if len(self.entries) > self.size:
            self._count(self.entries.popleft(), -1)

    def _count(self, entry: tuple[bool, bool, float], sign: int) -> None:
        is_class, correct, abs_error = entry
        self.correct += sign * correct
        self.non_class += sign * (not is_class)
        self.abs_error += sign * abs_error

    def quality(self, version: int) -> Quality:
        labelled = len(self.entries)
        if self.non_class == 0:
            counts = QualityCounts(self.correct, labelled)
            return Quality(version, "accuracy", counts.accuracy, labelled, counts)
        return Quality(version, "mae", max(self.abs_error, 0.0) / labelled, labelled)


class FeedbackService:
    """Feedback for one prediction log; ``live_quality[model][version]`` is QualityCounts (accuracy) or
    the mean absolute error (regression), over the version's newest ``window`` labels."""

    def __init__(self, prediction_log: PredictionLog, metrics, window: int = LABELLED_WINDOW) -> None:
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.window = window
        self.windows: dict[tuple[str, int], QualityWindow] = {}
        self.live_quality: dict[str, dict[int, QualityCounts | float]] = {}

    async def __call__(self, name: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """Record ``items`` (request id, label) for model ``name``; raises InvalidInput when none was accepted."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self.prediction_log.feedback, name, items)
        for outcome, count in (("accepted", result.accepted), ("unknown", len(result.unknown)), ("duplicate", len(result.duplicate))):
            self.metrics.feedback.labels(name, outcome).inc(count)
        self.add(name, result.joined)
        if items and not result.accepted:
            raise InvalidInput(f"no label accepted: unknown request ids {result.unknown[:5]}, already labelled {result.duplicate[:5]}")
        return {"accepted": result.accepted, "unknown": result.unknown, "duplicate": result.duplicate}

    def add(self, name: str, joined: list[Joined]) -> None:
        """Fold accepted labels into their versions' windows and publish the versions they changed."""
        changed = set()
        for item in joined:
            key = (name, item.version)
            window = self.windows.get(key)
            if window is None:
                window = self.windows[key] = QualityWindow(self.window)
            window.add(item.output, item.label)
            changed.add(item.version)
        for version in sorted(changed):
            self._publish(name, self.windows[(name, version)].quality(version))

    def _publish(self, name: str, quality: Quality) -> None:
        self.metrics.quality.labels(name, str(quality.version), quality.metric).set(quality.value)
        self.metrics.labelled.labels(name, str(quality.version)).set(quality.samples)
        self.live_quality.setdefault(name, {})[quality.version] = quality.counts if quality.counts is not None else quality.value
