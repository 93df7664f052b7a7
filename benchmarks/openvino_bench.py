"""The OpenVINO engine against ONNX Runtime on the digits CNN, side by side in one run.

ONNX Runtime fp32, OpenVINO fp32 and OpenVINO running the NNCF int8 model (the ``openvino_int8`` pass;
ONNX Runtime on that same model as a fourth row): latency p50 at batch 1 and throughput at batch 64,
2 threads each, measured with ``leanserve.measure.measure_speed`` in interleaved rounds so machine
noise hits all alike, and top-1 accuracy on the held-out digits. Target: int8 within 0.5 points of fp32.

    python benchmarks/openvino_bench.py [--rounds 3] [--epochs 10] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def build_models(work: Path, epochs: int) -> tuple[Path, Path, list[str], tuple]:
    """Train and export the digits CNN, quantize it with NNCF; (fp32 path, int8 path, notes, data)."""
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.formats import read_model
    from leanserve.from_torch import export
    from leanserve.optimize.recipe import apply_recipe, parse_recipe
    from leanserve.optimize.steps import PassContext

    data = digits_dataset()
    x_train, x_test, y_train, _ = data
    module = train_cnn(x_train, y_train, epochs=epochs, progress=False)
    fp32 = work / "cnn.onnx"
    export(module, torch.from_numpy(x_test[:2]), fp32, input_names=["image"], output_names=["logits"])
    ctx = PassContext(read_model(fp32).signature, {"image": x_train[:300]})
    int8 = work / "cnn_nncf_int8.onnx"
    notes = apply_recipe(parse_recipe("openvino_int8"), fp32, int8, ctx)
    return fp32, int8, notes, data


def sessions(fp32: Path, int8: Path, threads: int) -> dict:
    from leanserve import RuntimeOptions
    from leanserve.runtime import load_file

    def load(path: Path, engine: str):
        return load_file(path, RuntimeOptions(engine=engine, intra_op_threads=threads))

    return {
        "ONNX Runtime fp32": load(fp32, "onnxruntime"),
        "OpenVINO fp32": load(fp32, "openvino"),
        "OpenVINO NNCF int8": load(int8, "openvino"),
        "ONNX Runtime NNCF int8": load(int8, "onnxruntime"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from leanserve.measure import cpu_description, measure_speed

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} logical cores; {', '.join(cpu['flags']) or 'no AVX2/VNNI'})")
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8, notes, (_, x_test, _, y_test) = build_models(Path(tmp), args.epochs)
        print("NNCF: " + "; ".join(notes))
        runs = sessions(fp32, int8, args.threads)
        eval_data = {"image": x_test}
        accuracy = {name: float(np.mean(s.run(eval_data)["logits"].argmax(1) == y_test)) for name, s in runs.items()}
        p50: dict[str, list[float]] = {name: [] for name in runs}
        throughput: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, session in runs.items():
                speed = measure_speed(session, eval_data, batch_size=64, min_time_s=1.0)
                p50[name].append(speed.latency_p50_ms)
                throughput[name].append(speed.throughput_rows_s)
    rows = {name: {"accuracy": accuracy[name], "p50_ms": float(np.median(p50[name])),
                   "rows_per_s_at_64": float(np.median(throughput[name]))} for name in runs}
    base = rows["ONNX Runtime fp32"]
    print(f"\ndigits CNN, {args.threads} threads, medians of {args.rounds} interleaved rounds, {len(y_test)} held-out images")
    print(f"{'':<24} {'top-1':>7} {'p50 @1 (ms)':>12} {'vs ORT':>7} {'rows/s @64':>11} {'vs ORT':>7}")
    for name, r in rows.items():
        print(f"{name:<24} {r['accuracy']:>7.4f} {r['p50_ms']:>12.3f} {base['p50_ms'] / r['p50_ms']:>6.2f}x "
              f"{r['rows_per_s_at_64']:>11.0f} {r['rows_per_s_at_64'] / base['rows_per_s_at_64']:>6.2f}x")
    change = (rows["OpenVINO NNCF int8"]["accuracy"] - rows["OpenVINO fp32"]["accuracy"]) * 100 + 0.0  # no "-0.00"
    print(f"\nOpenVINO int8 vs fp32 top-1: {change:+.2f} points (target: within 0.5) -> {'met' if change >= -0.5 else 'MISSED'}")
    # Other work on the machine skews every figure; the load average says how much.
    print("load average (1 min) at start and end: {:.2f}, {:.2f}".format(load_start, os.getloadavg()[0]))
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "rows": rows, "nncf_notes": notes}, indent=2))


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    run_recorded("openvino_bench", main)
