"""``leanserve bench``: run one version on several engines on this machine and compare them side by side
(load time, latency at batch 1, throughput at a batch size, memory, agreement with ONNX Runtime),
without registering anything. The measurement is ``leanserve.measure``'s, shared with the optimizer."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat
from leanserve.measure import PeakMemory, Speed, measure_speed, outputs_mismatch, run_all
from leanserve.runtime import load_file, prepare


@dataclass
class EngineResult:
    """One engine's figures, or why it could not run the version."""

    engine: str
    prepare_s: float = math.nan  # compilation ahead of time (TVM); 0 for engines that read ONNX
    load_s: float = math.nan
    speed: Speed | None = None
    memory_bytes: int | None = None
    mismatch: str | None = None  # how the outputs differ from ONNX Runtime's, None when they agree
    error: str | None = None


def synthetic_inputs(signature: Signature, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` rows for timing when the user gives no data: standard normal floats, zero
    integers (valid token ids and indices), empty strings. Dynamic non-batch dimensions become 16."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in signature.inputs:
        shape = tuple(rows if axis == 0 else (16 if d == -1 else d) for axis, d in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            arrays[spec.name] = np.full(shape, b"", dtype=object)
        elif np.dtype(spec.dtype).kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return arrays


def compare_engines(artifact: ModelArtifact, engines: Sequence[str], data: Mapping[str, np.ndarray] | None = None, *,
                    batch_size: int = 32, options: RuntimeOptions | None = None, time_budget_s: float = 0.0,
                    speed_time_s: float = 1.0) -> list[EngineResult]:
    """Measure ``artifact`` (an ONNX version) on each engine; ONNX Runtime first, as the reference the
    others' outputs are checked against (engines added for the comparison when not asked for).
    ``time_budget_s`` is what an ahead-of-time engine may spend compiling (TVM tunes with it; 0: untuned)."""

    if artifact.manifest.format != "onnx":
        raise UnsupportedFormat(f"bench compares engines on ONNX versions; this version is {artifact.manifest.format}")
    options = options or RuntimeOptions()
    data = dict(data) if data is not None else synthetic_inputs(artifact.signature, max(batch_size, 64))
    missing = [n for n in artifact.signature.input_names if n not in data]
    if missing:
        raise InvalidInput(f"the data has no array for input {missing[0]!r}; inputs: {', '.join(artifact.signature.input_names)}")
    reference = None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in dict.fromkeys(("onnxruntime", *engines)):
            result = _measure(artifact, engine, data, batch_size, replace(options, engine=engine), time_budget_s,
                              speed_time_s, Path(tmp) / engine)
            outputs = result.pop_outputs()
            if engine == "onnxruntime":
                reference = outputs
            elif outputs is not None and reference is not None:
                result.mismatch = outputs_mismatch(outputs, reference)
            if engine in engines:
                results.append(result)
    return results


def _measure(artifact: ModelArtifact, engine: str, data, batch_size: int, options: RuntimeOptions,
             time_budget_s: float, speed_time_s: float, workdir: Path) -> _Measured:
    result = _Measured(engine)
    try:
        workdir.mkdir(parents=True)
        started = time.perf_counter()
        path = prepare(engine, artifact.model_path, workdir, artifact.signature, options, time_budget_s)
        result.prepare_s = time.perf_counter() - started if path != artifact.model_path else 0.0
        peak = PeakMemory().begin()
        started = time.perf_counter()
        session = load_file(path, options)  # options.engine is this engine
        result.load_s = time.perf_counter() - started
        try:
            result.outputs = run_all(session, data, batch_size)
            result.speed = measure_speed(session, data, batch_size=batch_size, min_time_s=speed_time_s)
            result.memory_bytes = peak.end()
        finally:
            session.close()
    except (LeanserveError, RuntimeError, ValueError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


@dataclass
class _Measured(EngineResult):
    outputs: dict[str, np.ndarray] | None = None

    def pop_outputs(self) -> dict[str, np.ndarray] | None:
        outputs, self.outputs = self.outputs, None
        return outputs


def format_table(results: Sequence[EngineResult], batch_size: int) -> str:
    """The comparison as a text table, ratios against ONNX Runtime's latency when it was measured."""
    base = next((r.speed for r in results if r.engine == "onnxruntime" and r.speed), None)
    lines = [f"{'engine':<12} {'compile s':>9} {'load s':>7} {'p50 ms':>8} {'p99 ms':>8} {'vs ORT':>7} "
             f"{f'rows/s (b={batch_size})':>16} {'peak MB':>9}  outputs"]
    for r in results:
        if r.error:
            lines.append(f"{r.engine:<12} failed: {r.error}")
            continue
        s = r.speed
        ratio = f"x{base.latency_p50_ms / s.latency_p50_ms:.2f}" if base else "—"
        memory = f"{r.memory_bytes / 1e6:.1f}" if r.memory_bytes is not None else "—"
        agreement = "reference" if r.engine == "onnxruntime" else ("match ONNX Runtime" if r.mismatch is None else f"MISMATCH: {r.mismatch}")
        lines.append(f"{r.engine:<12} {r.prepare_s:>9.1f} {r.load_s:>7.2f} {s.latency_p50_ms:>8.3f} {s.latency_p99_ms:>8.3f} "
                     f"{ratio:>7} {s.throughput_rows_s:>16,.0f} {memory:>9}  {agreement}")
    return "\n".join(lines)
