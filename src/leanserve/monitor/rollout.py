"""Guarded rollout: raise a canary's traffic share step by step while it stays as good as the primary,
and roll it back automatically, with the reason recorded, the moment it is not.

The judgement is a pure function (``judge``) of the two versions' live windows and live quality; the
``RolloutGuard`` applies it on a timer, writes every traffic change to the repository (so a restart
resumes where it was) and appends each decision to ``REPO/<model>/.rollout-events.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

from leanserve.config import RolloutConfig
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.monitor.live import WindowStats
from leanserve.monitor.periodic import Periodic
from leanserve.repository import Repository
from leanserve.serve.routing import primary as primary_of
from leanserve.serve.routing import set_traffic

log = logging.getLogger(__name__)
EVENTS_FILE = ".rollout-events.jsonl"


@dataclass(frozen=True)
class Verdict:
    """``hold`` (not enough evidence yet), ``advance``, or ``rollback`` with the reason."""

    action: str
    reason: str = ""


def judge(config: RolloutConfig, canary: WindowStats, primary: WindowStats, stage_age_s: float,
          canary_quality: float | None = None, primary_quality: float | None = None,
          shadow_agreement: float | None = None) -> Verdict:
    """Decide the next step of a canary from its live window against the primary's, its live quality
    from feedback, and how often it agreed with the primary while it ran as its shadow."""
    if canary.requests >= config.min_requests:
        if canary.error_rate - primary.error_rate > config.max_error_rate_increase:
            return Verdict("rollback", f"error rate {canary.error_rate:.2%} vs primary {primary.error_rate:.2%} "
                                       f"(allowed +{config.max_error_rate_increase:.2%})")
        allowed = max(config.max_p99_ratio * primary.p99_ms, primary.p99_ms + config.p99_slack_ms)
        if primary.requests and canary.p99_ms > allowed:
            return Verdict("rollback", f"p99 latency {canary.p99_ms:.2f} ms vs primary {primary.p99_ms:.2f} ms "
                                       f"(allowed x{config.max_p99_ratio:g} or +{config.p99_slack_ms:g} ms)")
    if canary_quality is not None and primary_quality is not None and primary_quality - canary_quality > config.max_quality_drop:
        return Verdict("rollback", f"live quality {canary_quality:.4f} vs primary {primary_quality:.4f} "
                                   f"(allowed drop {config.max_quality_drop:g})")
    if config.min_shadow_agreement is not None and shadow_agreement is not None and shadow_agreement < config.min_shadow_agreement:
        return Verdict("rollback", f"agreed with the primary on {shadow_agreement:.1%} of shadowed requests "
                                   f"(required {config.min_shadow_agreement:.0%})")
    if canary.requests >= config.min_requests and stage_age_s >= config.step_interval_s:
        return Verdict("advance")
    return Verdict("hold")


def start_rollout(repo: Repository, name: str, canary: int, **settings) -> RolloutConfig:
    """Begin a guarded canary of version ``canary`` against the current primary; persisted in the repository."""
    available = repo.versions(name)
    if canary not in available:
        raise InvalidInput(f"model {name!r} has no version {canary}")
    current = repo.config(name)
    primary = primary_of(current.traffic.weights) or max((v for v in available if v != canary), default=None)
    if primary is None or primary == canary:
        raise InvalidInput(f"a canary needs another version serving as primary; model {name!r} has only version {canary}")
    rollout = RolloutConfig(canary=canary, primary=primary, **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    traffic = set_traffic(current.traffic, _weights(rollout))
    repo.update_config(name, rollout=rollout, traffic=traffic)
    record_event(repo, name, "start", f"canary {canary} against primary {primary}, steps {list(rollout.steps)}")
    return rollout


def _weights(rollout: RolloutConfig) -> dict[int, int]:
    share = rollout.steps[rollout.stage]
    return {rollout.canary: share} if share >= 100 else {rollout.primary: 100 - share, rollout.canary: share}


def record_event(repo: Repository, name: str, action: str, reason: str) -> None:
    """Append a decision to the model's rollout event log (JSON lines)."""
    line = json.dumps({"ts": round(time.time(), 3), "action": action, "reason": reason})
    with open(repo.root / name / EVENTS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_events(repo: Repository, name: str, limit: int = 50) -> list[dict]:
    path = repo.root / name / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[-limit:] if line.strip()]


class RolloutGuard(Periodic):
    """Applies ``judge`` to every model with an active rollout, every ``interval_s`` seconds."""

    def __init__(self, registry, plane, metrics, interval_s: float = 1.0) -> None:
        self.registry = registry
        self.plane = plane
        self.metrics = metrics
        self.interval_s = interval_s
        self._stage_started: dict[tuple[str, int, int], float] = {}

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
        key = (name, rollout.canary, rollout.stage)
        started = self._stage_started.setdefault(key, time.monotonic())
        window = min(rollout.step_interval_s, time.monotonic() - started) + self.interval_s
        stats = self.plane.live_stats
        quality = self.plane.live_quality.get(name, {})
        verdict = judge(rollout, stats.window(name, rollout.canary, window), stats.window(name, rollout.primary, window),
                        time.monotonic() - started, quality.get(rollout.canary), quality.get(rollout.primary),
                        self.plane.shadow_agreement(name, rollout.primary, rollout.canary))
        if verdict.action == "rollback":
            await self._apply(name, rollout, None, verdict.reason)
        elif verdict.action == "advance":
            await self._apply(name, rollout, rollout.stage + 1, "")
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
            record_event(repo, name, "promoted", f"canary {rollout.canary} now takes all traffic")
            log.info("model %s: canary %d promoted", name, rollout.canary)
        else:
            advanced = replace(rollout, stage=stage)
            repo.update_config(name, traffic=set_traffic(current.traffic, _weights(advanced)), rollout=advanced)
            record_event(repo, name, "advance", f"canary {rollout.canary} to {rollout.steps[stage]}% of traffic")
        await self.registry.sync_model(name)
