"""Guarded rollout: raise a canary's traffic share step by step while it stays as good as the primary,
and roll it back automatically, with the reason recorded, the moment it is not.

The judgement is a pure function (``judge``) of the two versions' live windows and live quality; the
``RolloutGuard`` applies it on a timer, writes every traffic change to the repository (so a restart
resumes where it was) and appends each decision to ``REPO/<model>/.rollout-events.jsonl``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

from scipy.stats import binomtest, norm

from leanserve.config import RolloutConfig
from leanserve.errors import LeanserveError
from leanserve.monitor.live import WindowStats
from leanserve.monitor.observers import LiveSignals
from leanserve.monitor.periodic import Periodic
from leanserve.monitor.quality import QualityCounts
from leanserve.traffic import record_event, set_traffic, weights_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """``hold`` (not enough evidence yet), ``advance`` or ``rollback``, always with the reason: the
    figures, sample sizes and interval or p-value behind it."""

    action: str
    reason: str = ""


@dataclass(frozen=True)
class Finding:
    """One metric's comparison: ``worse`` (beyond the margin, with the stated confidence), ``not worse``
    (shown within the margin), ``unsure`` (neither yet) or ``too few`` (below the minimum sample)."""

    outcome: str
    text: str


def judge(config: RolloutConfig, canary: WindowStats, primary: WindowStats, stage_age_s: float,
          canary_quality: QualityCounts | None = None, primary_quality: QualityCounts | None = None,
          shadow_agreement: float | None = None) -> Verdict:
    """Decide the next step of a canary: its window at this step against the primary's, its accuracy
    from feedback (counts over the rollout; not judged when either is None), and how often it agreed
    with the primary while it ran as its shadow. Pure: the same inputs give the same verdict.

    Rolls back when any metric is worse beyond its margin with ``config.confidence``; advances when
    every judged metric is shown not worse and the step has lasted ``step_interval_s``; else holds.
    """
    if config.min_shadow_agreement is not None and shadow_agreement is not None and shadow_agreement < config.min_shadow_agreement:
        return Verdict("rollback", f"agreed with the primary on {shadow_agreement:.1%} of shadowed requests "
                                   f"(required {config.min_shadow_agreement:.0%})")
    findings = [*_request_findings(config, canary, primary), *_quality_findings(config, canary_quality, primary_quality)]
    by_outcome = {o: [f.text for f in findings if f.outcome == o] for o in ("worse", "too few", "unsure", "not worse")}
    if by_outcome["worse"]:
        return Verdict("rollback", "; ".join(by_outcome["worse"]))
    if by_outcome["too few"] or by_outcome["unsure"]:
        return Verdict("hold", "holding: " + "; ".join(by_outcome["too few"] + by_outcome["unsure"]))
    if stage_age_s < config.step_interval_s:
        return Verdict("hold", f"holding: {stage_age_s:.0f} of {config.step_interval_s:g} s at this step; " + "; ".join(by_outcome["not worse"]))
    return Verdict("advance", "advancing: " + "; ".join(by_outcome["not worse"]))


def _request_findings(config: RolloutConfig, canary: WindowStats, primary: WindowStats) -> list[Finding]:
    """Error rate and latency, once both versions have ``min_requests`` requests."""
    short = [f"{who} has {w.requests} of {config.min_requests} requests needed"
             for who, w in (("canary", canary), ("primary", primary)) if w.requests < config.min_requests]
    if short:
        return [Finding("too few", "; ".join(short))]
    head = (f"error rate {canary.error_rate:.2%} ({canary.errors}/{canary.requests}) vs primary "
            f"{primary.error_rate:.2%} ({primary.errors}/{primary.requests})")
    return [_compare_rates(head, "increase", canary.errors, canary.requests, primary.errors, primary.requests,
                           config.max_error_rate_increase, config.confidence),
            _compare_latency(config, canary, primary)]


def _quality_findings(config: RolloutConfig, canary: QualityCounts | None, primary: QualityCounts | None) -> list[Finding]:
    """Accuracy, once both versions have ``min_quality_samples`` labelled samples; compared through the
    rates of wrong answers, so a drop in accuracy is an increase in the canary's wrong rate."""
    if canary is None or primary is None:
        return []
    short = [f"{who} has {q.labelled} of {config.min_quality_samples} labelled samples needed"
             for who, q in (("canary", canary), ("primary", primary)) if q.labelled < config.min_quality_samples]
    if short:
        return [Finding("too few", "; ".join(short))]
    head = (f"accuracy {canary.accuracy:.2%} ({canary.correct}/{canary.labelled}) vs primary "
            f"{primary.accuracy:.2%} ({primary.correct}/{primary.labelled})")
    return [_compare_rates(head, "drop", canary.labelled - canary.correct, canary.labelled,
                           primary.labelled - primary.correct, primary.labelled, config.max_quality_drop, config.confidence)]


def _compare_rates(head: str, change: str, canary_bad: int, canary_n: int, primary_bad: int, primary_n: int,
                   margin: float, confidence: float) -> Finding:
    """Non-inferiority of the canary's rate of bad outcomes against the primary's: ``worse`` when the
    one-sided lower confidence bound of (canary rate - primary rate) exceeds ``margin``, ``not worse``
    when the upper bound is below it."""
    diff, low, high = rate_difference_bounds(canary_bad, canary_n, primary_bad, primary_n, confidence)
    text = f"{head}: {change} {diff * 100:+.2f} points, {confidence:.0%} bounds [{low * 100:+.2f}, {high * 100:+.2f}]"
    if low > margin:
        return Finding("worse", f"{text}, all above the allowed {margin * 100:.2f} (Newcombe-Wilson)")
    if high < margin:
        return Finding("not worse", f"{text} < allowed {margin * 100:.2f}")
    return Finding("unsure", f"{text} straddle the allowed {margin * 100:.2f}")


def rate_difference_bounds(bad_a: int, n_a: int, bad_b: int, n_b: int, confidence: float) -> tuple[float, float, float]:
    """``(d, low, high)`` for d = bad_a/n_a - bad_b/n_b, each bound one-sided at ``confidence``, by
    Newcombe's hybrid score method (his method 10) on Wilson intervals. Unlike the Wald z-interval it
    stays sensible at rates near 0 or 1 and with zero counts, which is where error rates live."""
    level = 2 * confidence - 1  # a two-sided interval at 2c-1 has each end one-sided at c
    p_a, p_b = bad_a / n_a, bad_b / n_b
    low_a, high_a = _wilson(bad_a, n_a, level)
    low_b, high_b = _wilson(bad_b, n_b, level)
    d = p_a - p_b
    return d, d - math.hypot(p_a - low_a, high_b - p_b), d + math.hypot(high_a - p_a, p_b - low_b)


def _wilson(k: int, n: int, level: float) -> tuple[float, float]:
    # The closed form, written out: scipy's binomtest(k, n).proportion_ci(method="wilson") gives the same
    # interval but also computes a p-value we do not use, ~0.5 ms a call, too slow for the simulation
    # in benchmarks/rollout_bench.py that calls the judge hundreds of thousands of times.
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _compare_latency(config: RolloutConfig, canary: WindowStats, primary: WindowStats) -> Finding:
    """The canary's latency tail against the primary's p99: when the canary is no slower than the allowed
    bound (x ``max_p99_ratio`` or + ``p99_slack_ms``, whichever is larger), at most 1% of its requests
    exceed that bound; a one-sided binomial test says when clearly more do. A p99 alone from a few
    dozen requests is its maximum, which is why two p99s are not compared directly."""
    allowed = max(config.max_p99_ratio * primary.p99_ms, primary.p99_ms + config.p99_slack_ms)
    latencies = canary.latencies_ms
    head = f"p99 latency {canary.p99_ms:.2f} ms vs primary {primary.p99_ms:.2f} ms"
    if latencies.size == 0:
        return Finding("not worse", f"{head}: no successful canary requests to time")
    slow = int((latencies > allowed).sum())
    p_value = float(binomtest(slow, latencies.size, 0.01, alternative="greater").pvalue)
    text = (f"{head}: {slow} of {latencies.size} canary requests over the allowed {allowed:.2f} ms "
            f"(x{config.max_p99_ratio:g} or +{config.p99_slack_ms:g} ms; 1% expected), binomial p={p_value:.2g}")
    return Finding("worse" if p_value < 1 - config.confidence else "not worse", text)


class RolloutGuard(Periodic):
    """Applies ``judge`` to every model with an active rollout, every ``interval_s`` seconds."""

    def __init__(self, registry, signals: LiveSignals, metrics, interval_s: float = 1.0) -> None:
        self.registry = registry
        self.signals = signals
        self.metrics = metrics
        self.interval_s = interval_s
        self._stage_started: dict[tuple[str, int, int], float] = {}
        self._rollout_started: dict[tuple[str, int], float] = {}
        self.last_verdict: dict[str, Verdict] = {}  # model -> the latest decision, holds included, for monitor

    async def tick(self) -> None:
        for name in list(self.registry.models):
            try:
                await self.check(name)
            except (LeanserveError, OSError) as exc:  # one model's trouble must not stop the others' guard
                log.error("rollout guard of %s: %s", name, exc)

    async def check(self, name: str) -> Verdict | None:
        """Judge one model's canary now and act on the verdict."""
        rollout = self.registry.repo.config(name).rollout
        if not rollout.active:
            return None
        now = time.monotonic()
        stage_started = self._stage_started.setdefault((name, rollout.canary, rollout.stage), now)
        rollout_started = self._rollout_started.setdefault((name, rollout.canary), now)
        stats = self.signals.live_stats
        # The canary is judged on everything it answered at this step; the primary on everything since
        # the rollout began, so a step that sends it no traffic (100%) still has something to compare with.
        canary_window = stats.window(name, rollout.canary, now - stage_started + self.interval_s)
        primary_window = stats.window(name, rollout.primary, now - rollout_started + self.interval_s)
        quality = (self.signals.live_quality or {}).get(name, {})
        verdict = judge(rollout, canary_window, primary_window, now - stage_started,
                        _counts(quality.get(rollout.canary)), _counts(quality.get(rollout.primary)),
                        self.signals.shadow_agreement(name, rollout.primary, rollout.canary))
        self.last_verdict[name] = verdict
        if verdict.action == "rollback":
            await self._apply(name, rollout, None, verdict.reason)
        elif verdict.action == "advance":
            await self._apply(name, rollout, rollout.stage + 1, verdict.reason)
        return verdict

    async def _apply(self, name: str, rollout: RolloutConfig, stage: int | None, reason: str) -> None:
        repo = self.registry.repo
        current = repo.config(name)
        if stage is None:
            traffic = set_traffic(current.traffic, {rollout.primary: 100})
            repo.update_config(name, traffic=traffic, rollout=RolloutConfig())
            record_event(repo, name, "rollback", f"canary {rollout.canary} rolled back: {reason}")
            self.metrics.rollbacks.labels(name).inc()
            log.warning("model %s: canary %d rolled back: %s", name, rollout.canary, reason)
        elif stage >= len(rollout.steps):
            repo.update_config(name, traffic=set_traffic(current.traffic, {rollout.canary: 100}), rollout=RolloutConfig())
            record_event(repo, name, "promoted", f"canary {rollout.canary} now takes all traffic: {reason}")
            log.info("model %s: canary %d promoted", name, rollout.canary)
        else:
            advanced = replace(rollout, stage=stage)
            repo.update_config(name, traffic=set_traffic(current.traffic, weights_of(advanced)), rollout=advanced)
            record_event(repo, name, "advance", f"canary {rollout.canary} to {rollout.steps[stage]}% of traffic: {reason}")
        await self.registry.sync_model(name)


def _counts(quality: object) -> QualityCounts | None:
    # The data plane keeps a plain accuracy per version today; accuracy is judged once it keeps the
    # counts behind it (QualityCounts from monitor/quality.py), since a rate alone cannot be tested.
    return quality if isinstance(quality, QualityCounts) else None
