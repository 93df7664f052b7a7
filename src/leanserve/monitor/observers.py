"""Monitoring on the request path, as observers the server composes when monitoring is on (see
``leanserve.serve.observers`` for the shape): each hands a request's figures off in microseconds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leanserve.monitor.live import LiveStats
from leanserve.monitor.store import PredictionLog


class LiveStatsObserver:
    """Every request a version answered into its live window, as the client saw it: an answer refused
    for invalid input counts as an error too (a canary that refuses what the primary accepts, say a
    post-processed version missing its ``group`` parameter, must show it to the rollout guard). Bodies
    that fail to decode never reach a version and are not counted."""

    def __init__(self, stats: LiveStats) -> None:
        self.stats = stats

    def after(self, call) -> None:
        self.stats.record(call.model, call.handle.ref.version, call.elapsed_s * 1000, call.outcome == "success")


class PredictionLogObserver:
    """A sample of answered requests (inputs, outputs, request id, group) into the prediction log."""

    def __init__(self, prediction_log: PredictionLog) -> None:
        self.log = prediction_log

    def after(self, call) -> None:
        if call.outcome == "success":
            group = call.request.parameters.get("group")
            self.log.record(call.model, call.handle.ref.version, call.request.id or "", call.request.inputs,
                            call.outputs, call.elapsed_s * 1000, None if group is None else str(group))


@dataclass(frozen=True)
class LiveSignals:
    """What the server measures live, as the monitor and the rollout guard read it."""

    live_stats: LiveStats
    prediction_log: PredictionLog | None = None
    live_quality: dict[str, dict[int, Any]] | None = None  # FeedbackService.live_quality
    shadow_agreement: Callable[..., float | None] = lambda name, version, shadow=None: None
    explanations: Callable[[str, int], dict[str, Any] | None] | None = None  # importance summary of a version
