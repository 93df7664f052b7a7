"""Live request statistics per version: a bounded window of (time, latency, ok) kept in memory.

Updated on the request path (one deque append), read by the alert rules, the guarded rollout and the
dashboard. Percentiles come from numpy over the window, not from Prometheus, so decisions need no
scraper.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class WindowStats:
    """Requests, error rate, latency percentiles and throughput over the last ``window_s`` seconds.

    ``latencies_ms`` holds the latency of every successful request of the window, so the rollout
    guard can test the canary's latencies against the primary's rather than compare two percentiles.
    """

    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    latencies_ms: np.ndarray = field(default_factory=lambda: np.empty(0), compare=False, repr=False)


def window_stats(latencies_ms: np.ndarray, ok: np.ndarray, span_s: float) -> WindowStats:
    """Statistics of one window's requests: ``latencies_ms`` and ``ok`` (bool) per request, observed
    over ``span_s`` seconds. Percentiles are over successful requests only (zeros when there are none)."""
    latencies_ms = np.asarray(latencies_ms, dtype=np.float64)
    ok = np.asarray(ok, dtype=bool)
    requests = int(ok.size)
    if not requests:
        return WindowStats(0, 0, 0.0, 0.0, 0.0, 0.0)
    errors = requests - int(ok.sum())
    good = latencies_ms[ok]
    p50, p99 = np.percentile(good, (50, 99)) if good.size else (0.0, 0.0)
    return WindowStats(requests, errors, errors / requests, float(p50), float(p99),
                       requests / max(span_s, 1e-3), good)


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
        now = time.monotonic()
        since = now - window_s
        recent = [e for e in self._events.get((model, version), ()) if e[0] >= since]
        if not recent:
            return WindowStats(0, 0, 0.0, 0.0, 0.0, 0.0)
        span = min(max(now - recent[0][0], 1e-3), window_s)
        return window_stats(np.array([e[1] for e in recent]), np.array([e[2] for e in recent]), span)

    def versions(self, model: str) -> list[int]:
        return sorted(v for m, v in self._events if m == model)
