"""Traffic across versions: weighted A/B and canary splits, sticky assignment, shadow, rollback, and the
state of a guarded rollout as the repository keeps it.

Pure functions of the traffic settings (``TrafficConfig`` and ``RolloutConfig`` in ``leanserve.config``), the
available versions and a request's routing key, so the server, the admin API, the CLI, the rollout guard
and the learners share one definition. Nothing here knows about HTTP or the running server.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Mapping, Sequence

from leanserve.config import RolloutConfig, TrafficConfig
from leanserve.errors import InvalidInput
from leanserve.repository import Repository

EVENTS_FILE = ".rollout-events.jsonl"


def choose_version(traffic: TrafficConfig, loaded: Sequence[int], routing_key: str | None = None,
                   rng: random.Random | None = None) -> int:
    """Pick the version a request goes to.

    Weighted among loaded versions named in ``traffic.weights``; everything to the newest loaded
    version when no weighted version is loaded. A routing key always maps to the same version for
    the same weights (a stable hash), so one user sees one version.
    """
    weights = [(v, w) for v, w in sorted(traffic.version_weights().items()) if v in loaded]
    if not weights:
        return max(loaded)
    if len(weights) == 1:
        return weights[0][0]
    total = sum(w for _, w in weights)
    if routing_key is not None:
        point = zlib.crc32(routing_key.encode("utf-8")) % total
    else:
        point = (rng or random).random() * total
    for version, weight in weights:
        if point < weight:
            return version
        point -= weight
    return weights[-1][0]


def set_traffic(traffic: TrafficConfig, weights: Mapping[int | str, int] | None,
                shadow: int | None | str = "keep") -> TrafficConfig:
    """New traffic settings with ``weights`` (and ``shadow``, unless "keep"); the old weights go to history."""
    new_weights = traffic.weights if weights is None else {str(k): v for k, v in weights.items()}
    history = traffic.history + ((dict(traffic.weights),) if traffic.weights and weights is not None else ())
    return TrafficConfig(
        weights=new_weights,
        shadow=traffic.shadow if shadow == "keep" else shadow,
        history=history,
    )


def primary(weights: Mapping[str, int]) -> int | None:
    """The version with the largest weight (the highest version on a tie), or None."""
    if not weights:
        return None
    return max(((w, int(v)) for v, w in weights.items()))[1]


def rollback(traffic: TrafficConfig, available: Sequence[int]) -> tuple[TrafficConfig, int]:
    """Move all traffic to the previous version in one step; returns the new settings and that version.

    The previous version is the primary of the newest earlier split that differs from the current
    one (so a canary at 10% rolls back to the version that had all traffic before it). Without such
    history: the current primary when a canary is running, else the newest older version. Raises
    InvalidInput when there is nothing to roll back to.
    """
    current = primary(traffic.weights) or (max(available) if available else None)
    canary_running = len(traffic.version_weights()) > 1
    target = None
    for earlier in reversed(traffic.history):
        candidate = primary(earlier)
        if dict(earlier) != dict(traffic.weights) and candidate in available and (candidate != current or canary_running):
            target = candidate
            break
    if target is None and canary_running:
        target = current
    if target is None:
        older = [v for v in available if current is not None and v < current]
        if not older:
            raise InvalidInput(f"nothing to roll back to: no version older than {current} is available")
        target = max(older)
    history = traffic.history + ((dict(traffic.weights),) if traffic.weights else ({str(current): 100},))
    return TrafficConfig(weights={str(target): 100}, shadow=None, history=history), target


# --- rollout state in the repository ---------------------------------------------------------------

def start_rollout(repo: Repository, name: str, canary: int, **settings) -> RolloutConfig:
    """Begin a guarded canary of version ``canary`` against the current primary; persisted in the repository."""
    available = repo.versions(name)
    if canary not in available:
        raise InvalidInput(f"model {name!r} has no version {canary}")
    current = repo.config(name)
    serving = primary(current.traffic.weights) or max((v for v in available if v != canary), default=None)
    if serving is None or serving == canary:
        raise InvalidInput(f"a canary needs another version serving as primary; model {name!r} has only version {canary}")
    rollout = RolloutConfig(canary=canary, primary=serving, **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    traffic = set_traffic(current.traffic, weights_of(rollout))
    repo.update_config(name, rollout=rollout, traffic=traffic)
    record_event(repo, name, "start", f"canary {canary} against primary {serving}, steps {list(rollout.steps)}")
    return rollout


def weights_of(rollout: RolloutConfig) -> dict[int, int]:
    """The traffic weights of a rollout's current stage."""
    share = rollout.steps[rollout.stage]
    return {rollout.canary: share} if share >= 100 else {rollout.primary: 100 - share, rollout.canary: share}


def record_event(repo: Repository, name: str, action: str, reason: str) -> None:
    """Append a decision to the model's rollout event log (JSON lines)."""
    line = json.dumps({"ts": round(time.time(), 3), "action": action, "reason": reason})
    with open(repo.root / name / EVENTS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_events(repo: Repository, name: str, limit: int = 50) -> list[dict]:
    """The newest ``limit`` rollout decisions of a model, oldest first."""
    path = repo.root / name / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[-limit:] if line.strip()]
