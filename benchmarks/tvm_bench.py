"""The TVM engine against ONNX Runtime on the digits CNN, side by side in one run.

ONNX Runtime, TVM with its default schedules (no tuning) and TVM tuned with MetaSchedule for
``--budget`` seconds: latency p50/p99 at batch 1, 2 threads each, measured with
``leanserve.measure.measure_speed`` in interleaved rounds so machine noise hits all alike; top-1 on the
held-out digits and the largest logit difference from ONNX Runtime. Tuning dominates the run time.

    python benchmarks/tvm_bench.py [--budget 180] [--rounds 3] [--epochs 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def export_cnn(work: Path, epochs: int) -> tuple[Path, tuple]:
    """Train the digits CNN and export it to ONNX; (onnx path, (x_train, x_test, y_train, y_test))."""
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export

    data = digits_dataset()
    x_train, x_test, y_train, _ = data
    module = train_cnn(x_train, y_train, epochs=epochs, progress=False)
    onnx_path = work / "cnn.onnx"
    export(module, torch.from_numpy(x_test[:2]), onnx_path, input_names=["image"], output_names=["logits"])
    return onnx_path, data


def compile_tvm(onnx_path: Path, work: Path, budget_s: float) -> tuple[Path, dict]:
    """Compile ``onnx_path`` with TVM in its own folder; (library, sidecar)."""
    from leanserve import RuntimeOptions
    from leanserve.formats import read_model, tvm_sidecar
    from leanserve.runtime import prepare

    work.mkdir()
    library = prepare("tvm", onnx_path, work, read_model(onnx_path).signature, RuntimeOptions(), budget_s)
    return library, json.loads(tvm_sidecar(library).read_text())


def load(path: Path, engine: str, threads: int):
    from leanserve import RuntimeOptions
    from leanserve.runtime import load_file

    return load_file(path, RuntimeOptions(engine=engine, intra_op_threads=threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=180.0, help="MetaSchedule tuning budget, seconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from leanserve.measure import cpu_description, measure_speed

    torch.set_num_threads(args.threads)
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} logical cores; {', '.join(cpu['flags']) or 'no AVX2/VNNI'})")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, (_, x_test, _, y_test) = export_cnn(Path(tmp), args.epochs)
        builds = {}
        for name, budget in (("TVM untuned", 0.0), (f"TVM tuned {args.budget:.0f} s", args.budget)):
            started = time.monotonic()
            builds[name] = compile_tvm(onnx_path, Path(tmp) / name.replace(" ", "_"), budget)
            print(f"{name}: compiled in {time.monotonic() - started:.0f} s "
                  f"({builds[name][1].get('tuning_records', 0)} tuning measurements kept)")
        runs = {"ONNX Runtime": load(onnx_path, "onnxruntime", args.threads)}
        runs.update({name: load(library, "tvm", args.threads) for name, (library, _) in builds.items()})
        eval_data = {"image": x_test}
        logits = {name: s.run(eval_data)["logits"] for name, s in runs.items()}
        p50: dict[str, list[float]] = {name: [] for name in runs}
        p99: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, session in runs.items():
                speed = measure_speed(session, eval_data, batch_size=1, min_time_s=1.0)
                p50[name].append(speed.latency_p50_ms)
                p99[name].append(speed.latency_p99_ms)
    reference = logits["ONNX Runtime"]
    rows = {name: {"accuracy": float(np.mean(out.argmax(1) == y_test)),
                   "max_abs_diff_vs_ort": float(np.abs(out - reference).max()),
                   "p50_ms": float(np.median(p50[name])), "p99_ms": float(np.median(p99[name]))}
            for name, out in logits.items()}
    base = rows["ONNX Runtime"]["p50_ms"]
    print(f"\ndigits CNN, batch 1, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    print(f"{'':<20} {'top-1':>7} {'|Δ| vs ORT':>11} {'p50 (ms)':>9} {'p99 (ms)':>9} {'ORT/this':>9}")
    for name, r in rows.items():
        print(f"{name:<20} {r['accuracy']:>7.4f} {r['max_abs_diff_vs_ort']:>11.2e} {r['p50_ms']:>9.3f} "
              f"{r['p99_ms']:>9.3f} {base / r['p50_ms']:>8.2f}x")
    if args.out:
        sidecars = {name: sidecar for name, (_, sidecar) in builds.items()}
        args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows, "tvm": sidecars}, indent=2))


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    run_recorded("tvm_bench", main)
