"""Edge targets of issue 8, measured side by side in one run on this machine.

The digits CNN as ORT format (int8) and as ExecuTorch programs (fp32 and int8, XNNPACK), next to the fp32
ONNX file: size, top-1 against the original, and latency and peak memory at batch 1 under the phone profile
(1 thread, ``leanserve edge``'s child process). Then MiniLM-L6 through ``leanserve edge --target ort``:
its artifact must be at most 25% of the fp32 file with cosine to fp32 at least 0.99.

Quality is held-out: ``leanserve edge`` chooses int8 on a selection part of the evaluation data (70%) and
reports accuracy on the rest, which is what is printed and graded here.

    python benchmarks/edge_bench.py [--only cnn|minilm] [--seconds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def row(name: str, size: int, original: int, quality: str, run) -> str:
    memory = f"{run.peak_rss_mb - (run.runtime_rss_mb or 0):7.1f}" if run.fits else "    n/a"
    speed = f"{run.latency_p50_ms:8.3f} {run.latency_p99_ms:8.3f}" if run.fits else f"did not run: {run.error}"
    return f"  {name:<36} {size:>10,} {size / original:6.1%} {quality:>14} {memory} {speed}"


def cnn_section(work: Path, seconds: float) -> list[tuple[str, str, bool]]:
    import torch

    import leanserve
    from leanserve.deploy.edge.build import build_edge
    from leanserve.deploy.edge.device import PROFILES, run_on_device
    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.torch_source import save_program

    x_train, x_test, y_train, y_test = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=10, progress=False)
    export(module, torch.from_numpy(x_test[:2]), work / "cnn.onnx", input_names=["image"], output_names=["logits"])
    program = save_program(module, torch.from_numpy(x_test[:2]), work)
    np.savez(work / "eval.npz", image=x_test, labels=y_test)
    repo = leanserve.Repository(work / "repo")
    repo.add(work / "cnn.onnx", "cnn", attachments=[program])
    phone = PROFILES["phone"]
    original = (work / "cnn.onnx").stat().st_size
    samples = {"image": x_test[:64]}
    print(f"\ndigits CNN under the {phone.describe()} profile (latency at batch 1, memory: the model's share):")
    print(f"  {'artifact':<36} {'bytes':>10} {'of fp32':>6} {'held-out drop':>14} {'MB':>7} {'p50 ms':>8} {'p99 ms':>8}")
    print(row("ONNX fp32 (ONNX Runtime)", original, original, "-", run_on_device(work / "cnn.onnx", samples, phone,
                                                                                 min_time_s=seconds)))
    ort = build_edge(repo, "cnn", 1, target="ort", profile=phone, eval_path=work / "eval.npz", probe_time_s=seconds)
    r = ort.report
    print(row("ORT format: " + r.recipe.replace(" weights", "").replace("dynamic ", ""), r.artifact_bytes, original, f"{r.accuracy.drop * 100:+.2f} pt", r.device))
    verdicts = [(f"CNN ORT artifact: {r.size_ratio:.1%} of fp32", "<= 30%", r.size_ratio <= 0.30)]
    if importlib.util.find_spec("executorch") is None:
        print("  ExecuTorch is not installed (pip install 'leanserve[edge]'): no .pte figures")
        return verdicts
    from leanserve.deploy.edge.executorch import FP32, build
    from leanserve.torch_source import load_program

    fp32 = build(load_program(repo.get("cnn", 1)).module(), (torch.from_numpy(x_test[:1]),), repo.get("cnn", 1).signature,
                 FP32, work / "pte-fp32", None)
    print(row("ExecuTorch fp32 (XNNPACK)", fp32.path.stat().st_size, original, "-",
              run_on_device(fp32.path, samples, phone, min_time_s=seconds)))
    pte = build_edge(repo, "cnn", 1, target="executorch", profile=phone, eval_path=work / "eval.npz",
                     probe_time_s=seconds).report
    print(row(f"ExecuTorch {pte.recipe.split(' (')[0]} (XNNPACK)", pte.artifact_bytes, original,
              f"{pte.accuracy.drop * 100:+.2f} pt", pte.device))
    print(f"  ExecuTorch's Python runtime (libtorch) holds {pte.device.runtime_rss_mb:.0f} MB before a program loads; "
          "a device's C++ runtime does not")
    verdicts.append((f"CNN ExecuTorch int8 held-out top-1 drop: {pte.accuracy.drop * 100:+.2f} points", "<= 1 point",
                     pte.int8 and pte.accuracy.within_budget))
    return verdicts


def minilm_section(work: Path, seconds: float) -> list[tuple[str, str, bool]]:
    import leanserve
    from leanserve.deploy.edge.build import build_edge
    from leanserve.deploy.edge.device import PROFILES
    from minilm import INPUTS, SENTENCES, export_minilm_onnx, load_minilm, tokenize

    _, tokenizer = load_minilm()
    export_minilm_onnx(work / "minilm.onnx")
    tokens = tokenize(tokenizer, SENTENCES, 64)
    np.savez(work / "minilm-eval.npz", **{k: tokens[k] for k in INPUTS})  # no labels: cosine to the fp32 outputs
    repo = leanserve.Repository(work / "minilm-repo")
    repo.add(work / "minilm.onnx", "minilm")
    report = build_edge(repo, "minilm", 1, target="ort", profile=PROFILES["pi4"], eval_path=work / "minilm-eval.npz",
                        max_drop="0.01", time_budget_s=900, probe_time_s=seconds).report
    print("\nMiniLM-L6 (sequence 64) through leanserve edge --target ort, pi4 profile:")
    print(f"  {report.recipe}: {report.artifact_bytes:,} bytes, {report.size_ratio:.1%} of fp32 "
          f"({report.original_bytes:,}); held-out cosine to fp32 {report.accuracy.artifact:.4f}; "
          f"p50 {report.device.latency_p50_ms:.2f} ms at batch 1")
    return [(f"MiniLM edge artifact: {report.size_ratio:.1%} of fp32", "<= 25%", report.size_ratio <= 0.25),
            (f"MiniLM edge held-out cosine to fp32: {report.accuracy.artifact:.4f}", ">= 0.99",
             report.accuracy.artifact >= 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cnn", "minilm"])
    parser.add_argument("--seconds", type=float, default=2.0, help="at least this long timing each artifact")
    parser.add_argument("--no-record", action="store_true", help="do not append the verdicts to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # before ONNX Runtime's quantizer sets the root logger to INFO
    from machine import print_header, record

    header = print_header("edge_bench")
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "cnn"):
            verdicts += cnn_section(Path(tmp), args.seconds)
        if args.only in (None, "minilm"):
            verdicts += minilm_section(Path(tmp), args.seconds)
    lines = [f"{'figure':<62} {'target':<12} verdict",
             *(f"{figure:<62} {target:<12} {'PASS' if ok else 'FAIL'}" for figure, target, ok in verdicts)]
    print("\n" + "\n".join(lines))
    if not args.no_record:
        record(header, lines)


if __name__ == "__main__":
    main()
