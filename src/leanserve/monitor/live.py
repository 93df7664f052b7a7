"""Live request statistics per version: a bounded window of (time, latency, ok) kept in memory.

Updated on the request path (one deque append), read by the alert rules, the guarded rollout and the
dashboard. Percentiles come from numpy over the window, not from Prometheus, so decisions need no
scraper.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowStats:
    """Requests, error rate, latency percentiles and throughput over the last ``window_s`` seconds."""

    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float
    throughput_rps: float


class LiveStats:
    """Recent outcomes of every (model, version)."""

    def __init__(self, max_events: int = 20_000) -> None:
        self._events: dict[tuple[str, int], collections.deque] = {}
        self._max = max_events

    def record(self, model: str, version: int, latency_ms: float, ok: bool) -> None:
        events = self._events.get((model, version))
        if events is None:
            events = self._events[(model, version)] = collections.deque(maxlen=self._max)
        events.append((time.monotonic(), latency_ms, ok))

    def window(self, model: str, version: int, window_s: float = 60.0) -> WindowStats:
        """Statistics of the events of the last ``window_s`` seconds (zeros when there are none)."""
        since = time.monotonic() - window_s
        recent = [e for e in self._events.get((model, version), ()) if e[0] >= since]
        if not recent:
            return WindowStats(0, 0, 0.0, 0.0, 0.0, 0.0)
        latencies = np.array([e[1] for e in recent if e[2]] or [0.0])
        errors = sum(1 for e in recent if not e[2])
        span = max(time.monotonic() - recent[0][0], 1e-3)
        return WindowStats(len(recent), errors, errors / len(recent), float(np.percentile(latencies, 50)),
                           float(np.percentile(latencies, 99)), len(recent) / min(span, window_s))

    def versions(self, model: str) -> list[int]:
        return sorted(v for m, v in self._events if m == model)
