"""Run leanserve's GPU paths on a real GPU and print a verdict for each: PASS, FAIL (with the reason), or
SKIP (the execution provider is absent from this ONNX Runtime build). Until this runs on a GPU machine,
those paths are covered only by tests that fake the provider list.

    python benchmarks/gpu_check.py [--no-record]      # under 5 minutes; exit status 1 when any path FAILs

Paths, each on the demo CNN (trained two epochs on the bundled digits) registered in a temporary repository:
- cuda fp32: a session on CUDAExecutionProvider; outputs match the CPU's.
- cuda fp16 model: the optimizer's fp16 pass, run on CUDA; top-1 agrees with the CPU's fp32.
- tensorrt fp32 / fp16: sessions on TensorrtExecutionProvider (runtime.precision fp32 / fp16).
- tensorrt int8 table: the calibration table written on the CPU (as optimize attaches it), used for int8.
- tensorrt engine cache: the first load writes engines into the version's cache folder; a second load
  of the same version reuses them (no new engine files) and starts faster.
On a CPU-only install every path prints SKIP and nothing is built.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"


class Fail(Exception):
    """A path ran but did not do what it should; the message is the reason printed."""


def build_version(work: Path):
    """The demo CNN (two epochs), exported and registered with its TensorRT calibration table; returns
    (artifact, evaluation images, CPU logits)."""
    import torch

    from leanserve import Repository
    from leanserve.config import RuntimeOptions
    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.formats import read_model
    from leanserve.from_torch import export
    from leanserve.optimize.quantize import write_trt_calibration
    from leanserve.optimize.steps import PassContext
    from leanserve.runtime import load_session

    x_train, x_test, y_train, _ = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=2, progress=False)
    path = work / "cnn.onnx"
    export(module, torch.from_numpy(x_test[:2]), path, input_names=["image"], output_names=["logits"])
    table = write_trt_calibration(path, work / "table", PassContext(read_model(path).signature, {"image": x_train[:256]}))
    repo = Repository(work / "repo")
    artifact = repo.get("cnn", repo.add(path, "cnn", attachments=table).version)
    cpu = load_session(artifact, RuntimeOptions(providers=("CPUExecutionProvider",)))
    images = x_test[:128]
    reference = cpu.run({"image": images})["logits"]
    cpu.close()
    return artifact, images, reference


def run_on(artifact, providers: tuple[str, ...], images, precision: str = "fp32") -> np.ndarray:
    """Logits from a session on ``providers`` (by name: no silent fallback to the CPU)."""
    from leanserve.config import RuntimeOptions
    from leanserve.runtime import load_session

    session = load_session(artifact, RuntimeOptions(providers=providers, precision=precision))
    try:
        if session.providers[0] != providers[0]:
            raise Fail(f"the session runs on {session.providers[0]}, not {providers[0]}")
        return session.run({"image": images})["logits"]
    finally:
        session.close()


def close_to(got: np.ndarray, want: np.ndarray, tolerance: float, what: str) -> str:
    worst = float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))
    if worst > tolerance:
        raise Fail(f"{what}: largest difference {worst:.3g} of the output scale (tolerance {tolerance:g})")
    return f"largest difference {worst:.2g} of scale"


def agrees(got: np.ndarray, want: np.ndarray, minimum: float, what: str) -> str:
    share = float(np.mean(got.argmax(1) == want.argmax(1)))
    if share < minimum:
        raise Fail(f"{what}: top-1 agrees with the CPU on {share:.1%} of rows (need {minimum:.0%})")
    return f"top-1 agreement {share:.1%}"


def check_cuda_fp16_model(artifact, images, reference, work: Path) -> str:
    from leanserve import Repository
    from leanserve.optimize.quantize import to_fp16
    from leanserve.optimize.steps import PassContext

    half = work / "fp16.onnx"
    to_fp16(artifact.model_path, half, PassContext(artifact.signature))
    repo = Repository(work / "repo16")
    version = repo.get("cnn16", repo.add(half, "cnn16").version)
    return agrees(run_on(version, (CUDA,), images), reference, 0.97, "fp16 model on CUDA")


def check_engine_cache(artifact, images) -> str:
    from leanserve.runtime.onnxruntime import engine_cache_dir

    cache = engine_cache_dir(artifact)
    started = time.perf_counter()
    run_on(artifact, (TRT,), images[:1])
    first_s = time.perf_counter() - started
    engines = {p.name: p.stat().st_mtime_ns for p in cache.glob("*") if p.suffix in (".engine", ".profile")}
    if not engines:
        raise Fail(f"no engine files in {cache} after the first load")
    started = time.perf_counter()
    run_on(artifact, (TRT,), images[:1])
    second_s = time.perf_counter() - started
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*") if p.suffix in (".engine", ".profile")}
    if after != engines:
        raise Fail(f"the second load rebuilt engines ({sorted(set(after) - set(engines)) or 'rewritten'})")
    return f"{len(engines)} engine file(s) reused; first load {first_s:.1f} s, second {second_s:.1f} s"


def verdicts(available: list[str]) -> list[tuple[str, str, str]]:
    """(path, PASS/FAIL/SKIP, detail) for every GPU path."""
    needs = {"cuda fp32": CUDA, "cuda fp16 model": CUDA, "tensorrt fp32": TRT, "tensorrt fp16": TRT,
             "tensorrt int8 table": TRT, "tensorrt engine cache": TRT}
    if not any(provider in available for provider in needs.values()):
        return [(path, "SKIP", f"provider absent: {provider} (available: {', '.join(available)})")
                for path, provider in needs.items()]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        artifact, images, reference = build_version(work)
        # engine cache first: the other TensorRT paths would fill the cache before it is observed empty
        checks: dict[str, Callable[[], str]] = {
            "tensorrt engine cache": lambda: check_engine_cache(artifact, images),
            "cuda fp32": lambda: close_to(run_on(artifact, (CUDA,), images), reference, 1e-3, "CUDA fp32"),
            "cuda fp16 model": lambda: check_cuda_fp16_model(artifact, images, reference, work),
            "tensorrt fp32": lambda: close_to(run_on(artifact, (TRT,), images), reference, 1e-2, "TensorRT fp32"),
            "tensorrt fp16": lambda: agrees(run_on(artifact, (TRT,), images, "fp16"), reference, 0.97, "TensorRT fp16"),
            "tensorrt int8 table": lambda: agrees(run_on(artifact, (TRT,), images, "int8"), reference, 0.9,
                                                  "TensorRT int8"),
        }
        results = {}
        for path, check in checks.items():
            if needs[path] not in available:
                results[path] = ("SKIP", f"provider absent: {needs[path]}")
                continue
            try:
                results[path] = ("PASS", check())
            except Fail as exc:
                results[path] = ("FAIL", str(exc))
            except Exception as exc:  # a GPU path may fail in any library below us; report it, run the others
                results[path] = ("FAIL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return [(path, *results[path]) for path in needs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-record", action="store_true", help="do not append the verdicts to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    from machine import print_header, record

    import onnxruntime as ort

    header = print_header("gpu_check")
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}; providers: {', '.join(available)}")
    lines = [f"{path:<22} {verdict}" + (f": {detail}" if detail else "") for path, verdict, detail in verdicts(available)]
    print("\n".join(lines))
    if not args.no_record:
        record(header, [f"onnxruntime {ort.__version__}; providers: {', '.join(available)}", *lines])
    return 1 if any(" FAIL" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
