"""Measure a model the same way everywhere: size, memory, latency, throughput and task quality.

Shared by ``leanserve optimize`` (every candidate), the engine comparison and the benchmarks, so
figures from different places are comparable.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput
from leanserve.runtime import Session

LABELS = "labels"  # the key of the labels array in evaluation data


@dataclass(frozen=True)
class Speed:
    """Latency at batch 1 (milliseconds) and throughput at ``batch_size`` (rows per second)."""

    latency_p50_ms: float
    latency_p99_ms: float
    throughput_rows_s: float
    batch_size: int


@dataclass(frozen=True)
class Measurement:
    """Everything measured for one model variant."""

    size_bytes: int
    speed: Speed
    quality: float | None
    metric: str
    memory_bytes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux), or None where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """The most memory a stretch of work added to this process: resident memory at its high-water mark
    minus resident memory at the start. Linux resets the high-water mark (VmHWM) on writing 5 to
    /proc/self/clear_refs, so each measured stretch gets its own peak, not the process's lifetime one;
    elsewhere (or where the reset is refused) it falls back to the growth from start to end.

        with PeakMemory() as peak:
            ...load and run...
        peak.bytes   # None where /proc is unavailable
    """

    def __enter__(self) -> PeakMemory:
        return self.begin()

    def __exit__(self, *exc) -> None:
        self.end()

    def begin(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        # the start is read after the reset, as the mark it set: resident memory read before it could be
        # higher than the new mark when another thread frees memory in between (a CI run measured 0 for 40 MB)
        self.start = _vm_hwm() if self._hwm else rss_bytes()
        self.bytes: int | None = None
        return self

    def end(self) -> int | None:
        end = _vm_hwm() if self._hwm else rss_bytes()
        if self.start is not None and end is not None:
            self.bytes = max(0, end - self.start)
        return self.bytes


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_bytes()


def file_size(path: Path) -> int:
    """Size of a model: the file, or every file in a folder."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def slice_rows(data: Mapping[str, np.ndarray], start: int, stop: int, names: list[str]) -> dict[str, np.ndarray]:
    """Rows ``start:stop`` of the named arrays (wrapping around when ``data`` has too few rows)."""
    n = len(next(iter(data.values())))
    index = np.arange(start, stop) % n
    return {name: np.ascontiguousarray(data[name][index]) for name in names}


def measure_speed(session: Session, data: Mapping[str, np.ndarray], *, batch_size: int = 32,
                  min_repeats: int = 50, min_time_s: float = 1.0, warmup: int = 10) -> Speed:
    """Latency p50/p99 at batch 1 and throughput at ``batch_size``, after ``warmup`` runs.

    Runs at least ``min_repeats`` times and at least ``min_time_s`` seconds for each figure, cycling
    through the rows of ``data`` so caches see real variety.
    """
    names = session.signature.input_names
    singles = [slice_rows(data, i, i + 1, names) for i in range(min(64, len(next(iter(data.values())))))]
    for i in range(warmup):
        session.run(singles[i % len(singles)])
    times = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < min_repeats or time.perf_counter() < deadline:
        sample = singles[len(times) % len(singles)]
        start = time.perf_counter()
        session.run(sample)
        times.append(time.perf_counter() - start)
    batch = slice_rows(data, 0, batch_size, names)
    for _ in range(max(2, warmup // 4)):
        session.run(batch)
    runs, start = 0, time.perf_counter()
    while runs < max(5, min_repeats // 10) or time.perf_counter() - start < min_time_s:
        session.run(batch)
        runs += 1
    elapsed = time.perf_counter() - start
    ms = np.array(times) * 1000
    return Speed(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), runs * batch_size / elapsed, batch_size)


def run_all(session: Session, data: Mapping[str, np.ndarray], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run every row of ``data`` through ``session`` in batches; returns the concatenated outputs."""
    names = session.signature.input_names
    n = len(data[names[0]])
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n, batch_size):
        parts.append(session.run({k: data[k][start:start + batch_size] for k in names}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- quality ----------------------------------------------------------------------------------------

Metric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None], float]
HIGHER_IS_BETTER = {"top1": True, "cosine": True, "mse": False}


def top1(outputs, data, reference) -> float:
    """Share of rows whose highest-scoring class (first output) equals the label."""
    if LABELS not in data:
        raise InvalidInput(f"the top1 metric needs a '{LABELS}' array in the evaluation data")
    scores = next(iter(outputs.values()))
    return float((scores.argmax(axis=-1) == data[LABELS]).mean())


def cosine(outputs, data, reference) -> float:
    """Mean cosine similarity of each row of the first output to the reference model's."""
    if reference is None:
        raise InvalidInput("the cosine metric compares with a reference model's outputs; none were given")
    a = next(iter(outputs.values())).reshape(len(next(iter(outputs.values()))), -1).astype(np.float64)
    b = next(iter(reference.values())).reshape(len(a), -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(denom, 1e-12)))


def mse(outputs, data, reference) -> float:
    """Mean squared error of the first output against the labels (regression)."""
    if LABELS not in data:
        raise InvalidInput(f"the mse metric needs a '{LABELS}' array in the evaluation data")
    pred = next(iter(outputs.values())).astype(np.float64)
    return float(np.mean((pred.reshape(data[LABELS].shape) - data[LABELS]) ** 2))


METRICS: dict[str, Metric] = {"top1": top1, "cosine": cosine, "mse": mse}


def choose_metric(data: Mapping[str, np.ndarray], requested: str | None = None) -> str:
    """The metric to use: the requested one, else top1 with integer labels, mse with float labels, cosine without."""
    if requested:
        if requested not in METRICS:
            raise InvalidInput(f"unknown metric {requested!r}; choose one of {', '.join(METRICS)}")
        return requested
    if LABELS not in data:
        return "cosine"
    return "top1" if np.issubdtype(data[LABELS].dtype, np.integer) else "mse"


def quality_drop(metric: str, baseline: float, candidate: float) -> float:
    """How much worse ``candidate`` is than ``baseline`` (positive = worse), in the metric's units."""
    if math.isnan(candidate):
        return math.inf
    return baseline - candidate if HIGHER_IS_BETTER.get(metric, True) else candidate - baseline


def cpu_description() -> dict[str, Any]:
    """CPU model and the instruction sets that decide int8 speed (VNNI) — printed with every figure."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}



def saturating_int8() -> bool:
    """True on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI): there ONNX Runtime multiplies uint8
    activations by int8 weights with an instruction that adds pairs of products in 16 bits and saturates,
    so full-range int8 weights lose accuracy; 7-bit weights (the quantizer's ``reduce_range``) fit. On the
    digits CNN, static int8 lost 0.7 points of top-1 on an AVX2 EPYC and none on an AVX-512 VNNI one."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = set(cpu_description()["flags"])
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}

# Largest difference between engines on the same model, relative to the output's scale (its largest
# magnitude, at least 1): float engines reorder sums (1e-3 is generous for fp32); int8 engines quantize
# activations their own way, so quantized recipes get a looser bound and are judged by the budget.
_TOLERANCE = {"float32": 1e-3, "float64": 1e-6, "float16": 1e-2, "bfloat16": 3e-2}
_QUANTIZED_TOLERANCE = 0.1


def outputs_mismatch(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], loose: bool = False) -> str | None:
    """None when every output matches the reference within its dtype's tolerance, else what differs.
    Integer and boolean outputs (class ids, masks) may differ on at most 1% of elements (ties)."""
    for name, ref in reference.items():
        got = outputs.get(name)
        if got is None or got.shape != ref.shape:
            return f"output {name!r}: shape {None if got is None else list(got.shape)}, expected {list(ref.shape)}"
        if ref.dtype.kind == "f":
            scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
            worst = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) / scale if ref.size else 0.0
            tolerance = _QUANTIZED_TOLERANCE if loose else _TOLERANCE.get(ref.dtype.name, 1e-3)
            if not worst <= tolerance:
                return f"output {name!r}: largest difference {worst:.3g} of its scale (tolerance {tolerance:g})"
        elif ref.dtype.kind in "iub":
            share = float(np.mean(got != ref)) if ref.size else 0.0
            if share > 0.01:
                return f"output {name!r}: {share:.1%} of elements differ (tolerance 1%)"
    return None
