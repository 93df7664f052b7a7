"""A model run the way a device would run it: in a child process held to a device profile's intra-op
threads and memory cap (RLIMIT_AS), timed at batch 1, with its peak memory.

ONNX Runtime's cap covers the whole process, set before anything loads. ExecuTorch's Python runtime links
libtorch (hundreds of MB that a device's C++ runtime does not have), so its cap is what the process has
mapped once the runtime is imported plus the profile's memory: the program gets the profile's budget.
What is measured is this machine's CPU under the device's limits, not the device itself; the report
that uses it says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput


@dataclass(frozen=True)
class DeviceProfile:
    """The device an artifact is tested for: intra-op threads and a memory cap for the whole process."""

    name: str
    threads: int
    memory_mb: int

    def __post_init__(self) -> None:
        if self.threads < 1 or self.memory_mb < 1:
            raise InvalidInput(f"profile {self.name!r}: threads and memory_mb must be at least 1")

    def describe(self) -> str:
        return f"{self.name} ({self.threads} thread{'s' if self.threads > 1 else ''}, {self.memory_mb} MB)"


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("phone", threads=1, memory_mb=512),
    DeviceProfile("pi4", threads=4, memory_mb=1024),
    DeviceProfile("tiny", threads=1, memory_mb=256),
)}


def device_profile(name: str, *, threads: int | None = None, memory_mb: int | None = None) -> DeviceProfile:
    """The named profile, with ``threads``/``memory_mb`` overriding its own; InvalidInput for unknown names."""
    if name not in PROFILES:
        raise InvalidInput(f"unknown device profile {name!r}; choose one of {', '.join(PROFILES)} "
                           "(and --threads/--memory-mb to adjust it)")
    base = PROFILES[name]
    return DeviceProfile(base.name, base.threads if threads is None else threads,
                         base.memory_mb if memory_mb is None else memory_mb)


@dataclass(frozen=True)
class DeviceRun:
    """What the child process measured under the profile, or why it could not run (``error``)."""

    fits: bool
    peak_rss_mb: float | None = None
    load_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    runs: int = 0
    error: str | None = None
    runtime_rss_mb: float | None = None  # resident once the runtime is imported, before the model loads


# Run in a fresh interpreter, so the cap and the thread count hold before the runtime starts. Prints one
# JSON line; exit status 3 when anything failed.
_PROBE = r"""
import json, logging, resource, sys, time
args = json.loads(sys.argv[1])

def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

def cap(limit):
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def onnxruntime_runner():
    cap(args["memory_mb"] << 20)  # before numpy and ONNX Runtime load: the whole process, as on the device
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = args["threads"]
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    base_kb, start = status_kb("VmRSS"), time.perf_counter()
    session = ort.InferenceSession(args["model"], options, providers=["CPUExecutionProvider"])
    return (lambda feed: session.run(None, feed)), time.perf_counter() - start, base_kb

def executorch_runner():
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime
    portable_lib._unsafe_reset_threadpool(args["threads"])
    base_kb = status_kb("VmRSS")
    cap((status_kb("VmSize") << 10) + (args["memory_mb"] << 20))
    start = time.perf_counter()
    method = Runtime.get().load_program(args["model"]).load_method("forward")
    names = args["names"]
    return (lambda feed: method.execute([torch.from_numpy(feed[n]) for n in names])), time.perf_counter() - start, base_kb

try:
    run, load_s, base_kb = {"onnxruntime": onnxruntime_runner, "executorch": executorch_runner}[args["engine"]]()
    import numpy as np
    with np.load(args["inputs"]) as npz:
        data = {k: npz[k] for k in npz.files}
    rows = len(next(iter(data.values())))
    singles = [{k: v[i:i + 1] for k, v in data.items()} for i in range(rows)]
    for i in range(10):
        run(singles[i % rows])
    times, deadline = [], time.perf_counter() + args["min_time_s"]
    while len(times) < 50 or time.perf_counter() < deadline:
        start = time.perf_counter()
        run(singles[len(times) % rows])
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    try:  # ru_maxrss keeps the parent's high-water mark across fork and exec; VmHWM is this image's own
        peak_kb = status_kb("VmHWM")
    except (OSError, StopIteration, ValueError):
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_ms": load_s * 1000, "p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)],
                      "runs": len(times), "peak_rss_mb": peak_kb / 1024, "runtime_rss_mb": base_kb / 1024}))
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}))
    sys.exit(3)
"""

# the engine that runs each device format in the probe
_PROBE_ENGINES = {".ort": "onnxruntime", ".onnx": "onnxruntime", ".pte": "executorch"}


def run_on_device(model: Path, inputs: dict[str, np.ndarray], profile: DeviceProfile, *, min_time_s: float = 1.0,
                  timeout_s: float = 300.0) -> DeviceRun:
    """Run ``model`` (.ort, .onnx or .pte) at batch 1 on rows of ``inputs`` (in the model's input order) in a
    child process limited to the profile's memory (RLIMIT_AS) and threads; returns what it measured, or
    ``fits=False`` with the child's last words."""
    engine = _PROBE_ENGINES.get(Path(model).suffix)
    if engine is None:
        raise InvalidInput(f"{Path(model).name}: the device probe runs {', '.join(_PROBE_ENGINES)} files")
    with tempfile.TemporaryDirectory(prefix="leanserve-probe-") as tmp:
        samples = Path(tmp) / "inputs.npz"
        np.savez(samples, **inputs)
        args = {"model": str(Path(model).resolve()), "engine": engine, "names": list(inputs), "inputs": str(samples),
                "threads": profile.threads, "memory_mb": profile.memory_mb, "min_time_s": min_time_s}
        # One malloc arena and single-threaded BLAS: the host's Python stack, not the model, would
        # otherwise reserve hundreds of MB of address space that a device runtime never maps.
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": str(profile.threads),
               "ORT_DISABLE_TELEMETRY": "1"}
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                                  env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return DeviceRun(False, error=f"did not finish within {timeout_s:.0f} s")
    result = _last_json(done.stdout)
    if done.returncode == 0 and result and "error" not in result:
        return DeviceRun(True, round(result["peak_rss_mb"], 2), round(result["load_ms"], 2), round(result["p50"], 4),
                         round(result["p99"], 4), int(result["runs"]), runtime_rss_mb=round(result["runtime_rss_mb"], 2))
    reason = (result or {}).get("error") or _last_line(done.stderr) or f"exit status {done.returncode}"
    return DeviceRun(False, error=reason)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def host_notes(profile: DeviceProfile) -> tuple[str, ...]:
    """Caveats of measuring ``profile`` on this machine (more threads than cores)."""
    cores = os.cpu_count() or 1
    if profile.threads > cores:
        return (f"the profile asks for {profile.threads} threads but this machine has {cores} cores: "
                "the latency shows oversubscription, not the device",)
    return ()
