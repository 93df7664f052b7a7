"""Live request statistics per version: a bounded window of (time, latency, ok) kept in memory.

Updated on the request path (three item assignments), read by the alert rules, the guarded rollout and the
dashboard. Percentiles come from numpy over the window, not from Prometheus, so decisions need no
scraper.
"""

from __future__ import annotations

import array
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


class _Ring:
    """One version's newest ``size`` outcomes in preallocated buffers (array.array: an item assignment
    is cheaper on the request path than a deque of tuples, and numpy reads the buffers without copying)."""

    __slots__ = ("times", "latencies", "ok", "count", "next")

    def __init__(self, size: int) -> None:
        self.times = array.array("d", bytes(8 * size))
        self.latencies = array.array("d", bytes(8 * size))
        self.ok = bytearray(size)
        self.count = 0
        self.next = 0


class LiveStats:
    """Recent outcomes of every (model, version): the newest ``max_events`` each."""

    def __init__(self, max_events: int = 20_000) -> None:
        self._rings: dict[tuple[str, int], _Ring] = {}
        self._max = max_events

    def record(self, model: str, version: int, latency_ms: float, ok: bool) -> None:
        ring = self._rings.get((model, version))
        if ring is None:
            ring = self._rings[(model, version)] = _Ring(self._max)
        i = ring.next
        ring.times[i] = time.monotonic()
        ring.latencies[i] = latency_ms
        ring.ok[i] = ok
        ring.next = (i + 1) % self._max
        if ring.count < self._max:
            ring.count += 1

    def window(self, model: str, version: int, window_s: float = 60.0) -> WindowStats:
        """Statistics of the events of the last ``window_s`` seconds (zeros when there are none)."""
        ring = self._rings.get((model, version))
        if ring is None or not ring.count:
            return WindowStats(0, 0, 0.0, 0.0, 0.0, 0.0)
        now = time.monotonic()
        times = np.frombuffer(ring.times, dtype=np.float64)[:ring.count]
        recent = times >= now - window_s
        if not recent.any():
            return WindowStats(0, 0, 0.0, 0.0, 0.0, 0.0)
        span = min(max(now - float(times[recent].min()), 1e-3), window_s)
        latencies = np.frombuffer(ring.latencies, dtype=np.float64)[:ring.count][recent]
        ok = np.frombuffer(ring.ok, dtype=np.uint8)[:ring.count][recent].astype(bool)
        return window_stats(latencies, ok, span)

    def versions(self, model: str) -> list[int]:
        return sorted(v for m, v in self._rings if m == model)
