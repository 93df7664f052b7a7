"""The monitoring picture of a server: per model and version, live traffic, latency, errors, quality,
bias, drift and alerts, with a short history for charts. Shared by the dashboard, the JSON API and
``leanserve monitor``.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from leanserve.errors import LeanserveError
from leanserve.monitor.alerts import AlertSink, evaluate
from leanserve.monitor.observers import LiveSignals
from leanserve.monitor.periodic import Periodic
from leanserve.monitor.rounds import RoundWorker, drift_round, labels_round

log = logging.getLogger(__name__)
HISTORY_POINTS = 300


class Monitor(Periodic):
    """Samples live figures every ``interval_s``, recomputes quality and bias from labels every
    ``slow_interval_s``, and evaluates each model's alert rules."""

    def __init__(self, registry, signals: LiveSignals, metrics, interval_s: float = 1.0, slow_interval_s: float = 10.0) -> None:
        self.registry, self.signals, self.metrics = registry, signals, metrics
        self.interval_s, self.slow_interval_s = interval_s, slow_interval_s
        self.history: dict[tuple[str, int], collections.deque] = {}
        self.labels: dict[tuple[str, int], dict[str, Any]] = {}
        self.drift: dict[tuple[str, int], dict[str, Any]] = {}
        self.alerts = AlertSink(metrics)
        self._last_slow = 0.0
        self.worker = RoundWorker()  # the slow round's process, started at its first round
        self.guard = None  # the RolloutGuard, when the server runs one: its latest verdict per model is shown

    async def tick(self) -> None:
        """One round: history points, (periodically) labels and bias, then alert rules."""
        slow = time.monotonic() - self._last_slow >= self.slow_interval_s
        if slow:
            self._last_slow = time.monotonic()
        for name, entry in list(self.registry.models.items()):
            if slow and self.signals.prediction_log is not None:
                await self._refresh_labels(name)
                for version in list(entry.versions):
                    await self._refresh_drift(name, version)
            for version in list(entry.versions):
                window = self.signals.live_stats.window(name, version, entry.config.alerts.window_s)
                point = {"t": round(time.time(), 1), "rps": round(window.throughput_rps, 2), "p50_ms": round(window.p50_ms, 3),
                         "p99_ms": round(window.p99_ms, 3), "error_rate": round(window.error_rate, 4)}
                self.history.setdefault((name, version), collections.deque(maxlen=HISTORY_POINTS)).append(point)
                figures = self.figures(name, version, window)
                await self.alerts.update(name, version, evaluate(name, version, figures, entry.config.alerts), entry.config.alerts)

    async def _refresh_drift(self, name: str, version: int) -> None:
        """Compare the newest logged traffic of a version with its stored reference profile (in the worker)."""
        drift = await self.worker.run(drift_round, self.registry.repo.root, self.signals.prediction_log.config.path,
                                      name, version)
        if drift is None:
            return
        self.drift[(name, version)] = drift
        self.metrics.drift.labels(name, str(version)).set(1 if drift["drifted"] else 0)

    async def _refresh_labels(self, name: str) -> None:
        """Quality, bias and fairness of every version of a model from its labelled rows (in the worker)."""
        report = await self.worker.run(labels_round, self.signals.prediction_log.config.path, name)
        for bias in report.bias:
            self.labels.setdefault((name, bias.version), {})["bias"] = bias
        for version, quality in report.quality.items():
            self.labels.setdefault((name, version), {})["quality"] = quality
        if report.fairness:
            from leanserve.fairness import metrics as fairness

            for version, fair in report.fairness.items():
                self.labels.setdefault((name, version), {})["fairness"] = fair
                fairness.publish(self.metrics, name, version, fair)

    def stop(self) -> None:
        super().stop()
        self.worker.close()

    def figures(self, name: str, version: int, window=None) -> dict[str, Any]:
        """The latest figures of one version, as the alert rules and the dashboard read them (``window``:
        its live window when the caller has it already)."""
        entry = self.registry.models[name]
        if window is None:
            window = self.signals.live_stats.window(name, version, entry.config.alerts.window_s)
        labels = self.labels.get((name, version), {})
        quality, bias, fair = labels.get("quality"), labels.get("bias"), labels.get("fairness")
        drift = self.drift.get((name, version), {})
        return {
            "requests": window.requests, "errors": window.errors, "error_rate": window.error_rate,
            "p50_ms": window.p50_ms, "p99_ms": window.p99_ms, "throughput_rps": window.throughput_rps,
            "accuracy": quality.value if quality and quality.metric == "accuracy" else None,
            "mae": quality.value if quality and quality.metric == "mae" else None,
            "labelled": quality.samples if quality else 0,
            "bias_gap": bias.accuracy_gap if bias and len(bias.groups) > 1 else None,
            "bias_groups": [g.__dict__ for g in bias.groups] if bias else [],
            "positive_rate_gap": bias.positive_rate_gap if bias and len(bias.groups) > 1 else None,
            "demographic_parity_difference": fair.demographic_parity_difference if fair else None,
            "equalized_odds_difference": fair.equalized_odds_difference if fair else None,
            "fairness_groups": [g.__dict__ for g in fair.groups] if fair else [],
            "shadow_agreement": self.signals.shadow_agreement(name, version),
            "drifted": drift.get("drifted", False), "drift_features": drift.get("features", []),
        }

    def model_status(self, name: str) -> dict[str, Any]:
        """Everything the dashboard shows for one model."""
        from leanserve.traffic import read_events

        entry = self.registry.entry(name)
        explanations = self.signals.explanations
        verdict = self.guard.last_verdict.get(name) if self.guard is not None else None
        try:
            states = {str(v): state for v, state in self.registry.repo.state(name).items()}
        except (LeanserveError, OSError) as exc:  # the folder went away since the last poll
            log.warning("states of %s unreadable: %s", name, exc)
            states = {}
        versions = {}
        for version in sorted(entry.versions):
            versions[str(version)] = {**self.figures(name, version),
                                      "history": list(self.history.get((name, version), ()))[-120:],
                                      "explanations": explanations(name, version) if explanations else None}
        return {
            "model": name, "versions": versions,
            "traffic": {"weights": dict(entry.config.traffic.weights), "shadow": entry.config.traffic.shadow},
            "states": states,
            "rollout": {"canary": entry.config.rollout.canary, "primary": entry.config.rollout.primary,
                        "stage": entry.config.rollout.stage, "steps": list(entry.config.rollout.steps),
                        "verdict": {"action": verdict.action, "reason": verdict.reason} if verdict else None},
            "rollout_events": read_events(self.registry.repo, name, 20),
            "alerts": [a.__dict__ for a in self.alerts.active.values() if a.model == name],
            "alert_history": [h for h in self.alerts.history if h["model"] == name][-20:],
            "failed_versions": {str(v): why for v, why in entry.failed.items()},
        }

    def overview(self) -> dict[str, Any]:
        return {"models": {name: self.model_status(name) for name in sorted(self.registry.models)}}
