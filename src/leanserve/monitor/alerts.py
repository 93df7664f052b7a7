"""Alert rules on live figures: p99 latency, error rate, accuracy, bias gap, fairness gaps, shadow
agreement, drift.

``evaluate`` is a pure function from a version's figures and the model's rules to the alerts that
hold now; ``AlertSink`` turns changes into log lines, metrics and optional webhook calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from leanserve.config import AlertConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    model: str
    version: int
    rule: str
    message: str


def evaluate(model: str, version: int, figures: dict[str, Any], rules: AlertConfig) -> list[Alert]:
    """The alerts that hold for one version's ``figures`` (keys: p99_ms, error_rate, requests, accuracy,
    bias_gap, demographic_parity_difference, equalized_odds_difference, shadow_agreement, drifted, drift_features)."""
    found = []

    def fire(rule: str, message: str) -> None:
        found.append(Alert(model, version, rule, message))

    if rules.max_p99_ms is not None and figures.get("requests") and figures["p99_ms"] > rules.max_p99_ms:
        fire("p99_latency", f"p99 {figures['p99_ms']:.2f} ms above {rules.max_p99_ms:g} ms")
    if rules.max_error_rate is not None and figures.get("requests", 0) >= 20 and figures["error_rate"] > rules.max_error_rate:
        fire("error_rate", f"error rate {figures['error_rate']:.2%} above {rules.max_error_rate:.2%}")
    if rules.min_accuracy is not None and figures.get("accuracy") is not None and figures["accuracy"] < rules.min_accuracy:
        fire("accuracy", f"live accuracy {figures['accuracy']:.4f} below {rules.min_accuracy:g}")
    if rules.max_bias_gap is not None and figures.get("bias_gap") is not None and figures["bias_gap"] > rules.max_bias_gap:
        fire("bias_gap", f"accuracy gap between groups {figures['bias_gap']:.4f} above {rules.max_bias_gap:g}")
    for key, limit, what in (("demographic_parity_difference", rules.max_demographic_parity_difference, "selection rates"),
                             ("equalized_odds_difference", rules.max_equalized_odds_difference, "true/false positive rates")):
        if limit is not None and figures.get(key) is not None and figures[key] > limit:
            fire(key, f"{key.replace('_', ' ')} {figures[key]:.4f} above {limit:g} (largest gap in {what} between groups)")
    agreement = figures.get("shadow_agreement")
    if rules.min_shadow_agreement is not None and agreement is not None and agreement < rules.min_shadow_agreement:
        fire("shadow_agreement", f"shadow agreement {agreement:.2%} below {rules.min_shadow_agreement:.0%}")
    if rules.on_drift and figures.get("drifted"):
        fire("drift", "input or prediction drift: " + ", ".join(figures.get("drift_features", [])[:5]))
    return found


class AlertSink:
    """Remembers which alerts are active; logs, counts and posts each one when it starts and ends."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self.active: dict[tuple[str, int, str], Alert] = {}
        self.history: list[dict[str, Any]] = []

    async def update(self, model: str, version: int, alerts: list[Alert], rules: AlertConfig) -> None:
        now = {(a.model, a.version, a.rule): a for a in alerts}
        mine = {k for k in self.active if k[0] == model and k[1] == version}
        for key in now.keys() - mine:
            await self._notify("fired", now[key], rules)
        for key in mine - now.keys():
            await self._notify("resolved", self.active.pop(key), rules)
        self.active.update(now)

    async def _notify(self, state: str, alert: Alert, rules: AlertConfig) -> None:
        record = {"ts": round(time.time(), 3), "state": state, "model": alert.model, "version": alert.version,
                  "rule": alert.rule, "message": alert.message}
        self.history = (self.history + [record])[-200:]
        (log.warning if state == "fired" else log.info)("alert %s: %s:%d %s: %s", state, alert.model, alert.version,
                                                        alert.rule, alert.message)
        self.metrics.alerts_active.labels(alert.model, str(alert.version), alert.rule).set(1 if state == "fired" else 0)
        if state == "fired":
            self.metrics.alerts.labels(alert.model, alert.rule).inc()
        if rules.webhook_url:
            await _post(rules.webhook_url, record)


async def _post(url: str, record: dict[str, Any]) -> None:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            await client.post(url, json=record)
    except httpx.HTTPError as exc:  # a webhook that is down must not stop monitoring
        log.warning("alert webhook %s failed: %s", url, exc)
