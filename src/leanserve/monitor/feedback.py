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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput, ModelNotFound
from leanserve.monitor.quality import Quality, QualityCounts
from leanserve.monitor.reader import FeedbackResult, Joined
from leanserve.monitor.store import PredictionLog
from leanserve.repository import Repository

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


class VersionLabels:
    """The class names of each model version, by class index: a classifier pipeline's labels (``id2label``
    or a labels file at import), empty for other versions. Read once per version: a version's files
    never change."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._known: dict[tuple[str, int], tuple[str, ...]] = {}

    def __call__(self, name: str, version: int) -> tuple[str, ...]:
        key = (name, version)
        if key not in self._known:
            self._known[key] = self._read(name, version)
        return self._known[key]

    def _read(self, name: str, version: int) -> tuple[str, ...]:
        from leanserve.pipeline import PipelineSpec

        try:
            artifact = self.repo.get(name, version, verify=False)
        except ModelNotFound:
            return ()  # removed since it answered: its labels can only be class indices now
        return PipelineSpec.read(artifact.model_path).labels if artifact.manifest.format == "pipeline" else ()


class FeedbackService:
    """Feedback for one prediction log; ``live_quality[model][version]`` is QualityCounts (accuracy) or
    the mean absolute error (regression), over the version's newest ``window`` labels. With ``labels``
    (``VersionLabels``) a label may be a class name, mapped to its index by the answering version's labels."""

    def __init__(self, prediction_log: PredictionLog, metrics, window: int = LABELLED_WINDOW,
                 labels: Callable[[str, int], Sequence[str]] | None = None) -> None:
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.window = window
        self.labels = labels
        self.windows: dict[tuple[str, int], QualityWindow] = {}
        self.live_quality: dict[str, dict[int, QualityCounts | float]] = {}

    async def __call__(self, name: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """Record ``items`` (request id, label: a number or a class name) for model ``name``; raises
        InvalidInput when a class name is not one of the answering version's labels (nothing is recorded
        then) or when none was accepted."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self._record, name, items)
        for outcome, count in (("accepted", result.accepted), ("unknown", len(result.unknown)), ("duplicate", len(result.duplicate))):
            self.metrics.feedback.labels(name, outcome).inc(count)
        self.add(name, result.joined)
        if items and not result.accepted:
            raise InvalidInput(f"no label accepted: unknown request ids {result.unknown[:5]}, already labelled {result.duplicate[:5]}")
        return {"accepted": result.accepted, "unknown": result.unknown, "duplicate": result.duplicate}

    def _record(self, name: str, items: list[tuple[str, Any]]) -> FeedbackResult:
        items, unknown = self._class_indices(name, items)
        result = self.prediction_log.feedback(name, items) if items else FeedbackResult()
        result.unknown.extend(unknown)
        return result

    def _class_indices(self, name: str, items: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
        """``items`` with class names replaced by their indices in the labels of the version that answered
        each request, and the ids of named items not in the log. Raises InvalidInput for a name that is
        not one of that version's labels, before anything is recorded."""
        named = [request_id for request_id, label in items if isinstance(label, str)]
        if not named:
            return items, []
        versions = self.prediction_log.versions_of(name, named)
        mapped, unknown = [], []
        for request_id, label in items:
            if not isinstance(label, str):
                mapped.append((request_id, label))
            elif request_id not in versions:
                unknown.append(request_id)
            else:
                mapped.append((request_id, self._class_index(name, versions[request_id], label)))
        return mapped, unknown

    def _class_index(self, name: str, version: int, label: str) -> int:
        known = tuple(self.labels(name, version)) if self.labels else ()
        if not known:
            raise InvalidInput(f"feedback label {label!r}: {name}:{version} has no class names (it is not a "
                               "classifier pipeline); give the class index or the true value as a number")
        if label not in known:
            raise InvalidInput(f"feedback label {label!r} is not a class of {name}:{version}; its labels are "
                               f"{', '.join(map(repr, known))} (or give the class index)")
        return known.index(label)

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
