"""Delayed labels on the server: join true labels to logged predictions by request id, and keep each
version's live quality (accuracy with the counts behind it, or mean absolute error) for the gauges, the
monitor and the rollout guard."""

from __future__ import annotations

import asyncio
from typing import Any

from leanserve.errors import InvalidInput
from leanserve.monitor.quality import Quality, QualityCounts, rolling_quality
from leanserve.monitor.store import PredictionLog

LABELLED_WINDOW = 5000  # newest labelled samples per model behind the live quality


class FeedbackService:
    """Feedback for one prediction log; ``live_quality[model][version]`` is QualityCounts (accuracy) or
    the mean absolute error (regression)."""

    def __init__(self, prediction_log: PredictionLog, metrics) -> None:
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.live_quality: dict[str, dict[int, QualityCounts | float]] = {}

    async def __call__(self, name: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """Record ``items`` (request id, label) for model ``name``; raises InvalidInput when none was accepted."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self.prediction_log.feedback, name, items)
        for outcome, count in (("accepted", result.accepted), ("unknown", len(result.unknown)), ("duplicate", len(result.duplicate))):
            self.metrics.feedback.labels(name, outcome).inc(count)
        if result.accepted:
            rows = await loop.run_in_executor(None, lambda: self.prediction_log.rows(name, limit=LABELLED_WINDOW, labelled=True))
            for quality in rolling_quality(rows):
                self._publish(name, quality)
        if items and not result.accepted:
            raise InvalidInput(f"no label accepted: unknown request ids {result.unknown[:5]}, already labelled {result.duplicate[:5]}")
        return {"accepted": result.accepted, "unknown": result.unknown, "duplicate": result.duplicate}

    def _publish(self, name: str, quality: Quality) -> None:
        self.metrics.quality.labels(name, str(quality.version), quality.metric).set(quality.value)
        self.metrics.labelled.labels(name, str(quality.version)).set(quality.samples)
        self.live_quality.setdefault(name, {})[quality.version] = quality.counts if quality.counts is not None else quality.value
