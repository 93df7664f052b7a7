"""Optimization targets of issue 4, measured side by side in one run.

MiniLM-L6 (batch 1, sequence 64, 2 threads): PyTorch eager fp32, torch.ao dynamic int8, ONNX Runtime
fp32, ONNX Runtime's plain ``quantize_dynamic`` defaults, and the variant ``leanserve optimize`` chose,
timed in interleaved rounds so machine noise hits all alike. Digits CNN: static int8, structured
pruning and distillation accuracy against fp32.

Quality is held-out throughout: the optimizer chooses on a selection part of the sentences (digits) and
every cosine (top-1) printed and graded here is measured on the rest, which the choice never saw;
pruning and distillation train on the training digits and are graded on the test digits.

    python benchmarks/optimize_bench.py [--rounds 5] [--time-budget 300] [--only minilm|cnn] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(run, inputs: list, repeats: int) -> float:
    """Median milliseconds of ``run(x)`` over ``repeats`` calls cycling through ``inputs``."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def ort_runner(path: Path, threads: int = 2, spin: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def minilm_section(work: Path, rounds: int, time_budget: float) -> dict:
    import torch
    from onnxruntime.quantization import quantize_dynamic

    import leanserve
    from leanserve.optimize.run import optimize
    from minilm import INPUTS, SENTENCES, export_minilm_onnx, load_minilm, sentence_module, tokenize

    torch.set_num_threads(2)
    transformer, tokenizer = load_minilm()
    module = sentence_module(transformer)
    export_minilm_onnx(work / "minilm.onnx")
    from leanserve.holdout import split_holdout

    tokens = tokenize(tokenizer, SENTENCES, 64)
    split = split_holdout({n: tokens[n] for n in INPUTS}, holdout_fraction=0.3, seed=0)
    np.savez(work / "eval.npz", **split.selection)
    np.savez(work / "holdout.npz", **split.holdout)
    data = split.holdout  # every cosine below is on sentences the choice never saw
    repo = leanserve.Repository(work / "repo")
    repo.add(work / "minilm.onnx", "minilm")
    print(f"leanserve optimize (time budget {time_budget:.0f} s); sentences: {split.info.describe()}...")
    outcome = optimize(repo, "minilm", eval_path=work / "eval.npz", holdout_path=work / "holdout.npz", max_drop="0.01",
                       metric="cosine", time_budget_s=time_budget, progress=False, report_dir=work / "report")
    chosen = outcome.result.chosen
    for c in [outcome.result.baseline, *outcome.result.candidates]:
        m = c.measurement
        print(f"  {c.recipe.name:<45} " + (f"held-out cosine {c.holdout_quality:.4f}  p50 {m.speed.latency_p50_ms:.3f} ms  "
                                          f"{m.size_bytes / 1e6:.1f} MB" if m and c.holdout_quality is not None
                                          else f"failed: {c.error}"))
    print(f"  chosen: {chosen.recipe.name} ({chosen.recipe.describe()})")
    chosen_path = repo.get("minilm", outcome.ref.version).model_path if outcome.ref else work / "minilm.onnx"
    quantize_dynamic(work / "minilm.onnx", work / "plain_dynamic.onnx")  # ONNX Runtime's defaults
    torch_int8 = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)

    def torch_runner(model):
        def run(feed):
            with torch.inference_mode():
                return model(*(torch.from_numpy(feed[n]) for n in INPUTS)).numpy()
        return run

    variants = {
        "PyTorch eager fp32": (torch_runner(module), None),
        "torch.ao dynamic int8": (torch_runner(torch_int8), None),
        "ONNX Runtime fp32": (ort_runner(work / "minilm.onnx"), work / "minilm.onnx"),
        "ORT quantize_dynamic defaults": (ort_runner(work / "plain_dynamic.onnx"), work / "plain_dynamic.onnx"),
        f"leanserve: {chosen.recipe.name}": (ort_runner(chosen_path), chosen_path),
        f"leanserve: {chosen.recipe.name} (serving: no spin)": (ort_runner(chosen_path, spin=False), chosen_path),
        "ONNX Runtime fp32 (serving: no spin)": (ort_runner(work / "minilm.onnx", spin=False), work / "minilm.onnx"),
    }
    singles = [{n: tokens[n][i:i + 1] for n in INPUTS} for i in range(len(SENTENCES))]  # timing: every sentence
    reference = torch_runner(module)(data)
    results = {name: {"ms": [], "cosine": cosine(run(data), reference),
                      "size_mb": path.stat().st_size / 1e6 if path else None} for name, (run, path) in variants.items()}
    for name, (run, _) in variants.items():
        timed(run, singles, 20)  # warm-up
    for _ in range(rounds):
        for name, (run, _) in variants.items():
            results[name]["ms"].append(timed(run, singles, 100))
    for r in results.values():
        r["median_ms"] = float(np.median(r["ms"]))
    return {"variants": results, "chosen": chosen.recipe.name, "report": str(work / "report" / "report.md"),
            "holdout": split.info.to_dict()}


def minilm_verdicts(section: dict) -> list[tuple[str, str, bool]]:
    v = section["variants"]
    ours = next(r for n, r in v.items() if n.startswith("leanserve") and "serving" not in n)
    ort_fp32, torch_fp32 = v["ONNX Runtime fp32"], v["PyTorch eager fp32"]
    size = ours["size_mb"] / ort_fp32["size_mb"]
    return [
        (f"MiniLM int8 vs ORT fp32: {ort_fp32['median_ms'] / ours['median_ms']:.2f}x", ">= 2x (VNNI)", ort_fp32["median_ms"] / ours["median_ms"] >= 2),
        (f"MiniLM int8 vs PyTorch eager fp32: {torch_fp32['median_ms'] / ours['median_ms']:.2f}x", ">= 2.5x", torch_fp32["median_ms"] / ours["median_ms"] >= 2.5),
        (f"MiniLM int8 size: {size:.0%} of fp32", "<= 30%", size <= 0.30),
        (f"MiniLM int8 held-out cosine to fp32 ({section['holdout']['holdout_rows']} sentences): {ours['cosine']:.4f}",
         ">= 0.99", ours["cosine"] >= 0.99),
    ]


def cnn_section(work: Path) -> dict:
    import torch

    import leanserve
    from leanserve.demo import accuracy, digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.optimize.recipe import parse_recipe
    from leanserve.optimize.run import optimize

    x_train, x_test, y_train, y_test = digits_dataset()
    teacher = train_cnn(x_train, y_train, epochs=15, progress=False)
    fp32 = accuracy(teacher(torch.from_numpy(x_test)).detach().numpy(), y_test)
    export(teacher, torch.from_numpy(x_test[:2]), work / "cnn.onnx", input_names=["image"], output_names=["logits"])
    np.savez(work / "cnn_eval.npz", image=x_test, labels=y_test)
    np.savez(work / "cnn_calib.npz", image=x_train[:256])
    repo = leanserve.Repository(work / "cnn-repo")
    repo.add(work / "cnn.onnx", "cnn")
    outcome = optimize(repo, "cnn", eval_path=work / "cnn_eval.npz", calib_path=work / "cnn_calib.npz",
                       recipes=[parse_recipe("static_int8:method=minmax"), parse_recipe("static_int8:method=entropy")],
                       register=False, progress=False, time_budget_s=120)
    # held-out: the fp32 baseline and each int8 variant on the same rows the search did not choose on
    static = {c.recipe.name: (c.holdout_quality, outcome.result.baseline.holdout_quality)
              for c in outcome.result.candidates if c.holdout_quality is not None}
    result = {"fp32_top1": fp32, "static_int8_top1": static, "holdout": outcome.result.holdout.to_dict()}
    result.update(_prune_and_distill(teacher, x_train, y_train, x_test, y_test))
    return result


def _prune_and_distill(teacher, x_train, y_train, x_test, y_test) -> dict:
    """Structured pruning + fine-tune and distillation into a quarter-size student (optimize/prune, distill)."""
    try:
        from leanserve.optimize import distill, prune
    except ImportError as exc:
        return {"prune_distill": f"not available: {exc}"}
    return {"prune_distill": _run_prune_distill(prune, distill, teacher, x_train, y_train, x_test, y_test)}


def _run_prune_distill(prune, distill, teacher, x_train, y_train, x_test, y_test) -> dict:
    import copy

    import torch

    from leanserve.demo import accuracy

    def top1(model):
        with torch.no_grad():
            return accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)

    example = torch.from_numpy(x_test[:2])
    pruned = prune.iterative_prune_and_finetune(copy.deepcopy(teacher), example, x_train, y_train, target_ratio=0.5)
    pruned_model = getattr(pruned, "module", pruned)
    student = distill.width_student(teacher, example, 0.45)  # at most a quarter of the parameters
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = distill.distill(teacher, student, x_train, y_train, epochs=15, progress=False)
    student_model = getattr(report, "student", student)
    return {"pruned_top1": top1(pruned_model), "pruned_params": params(pruned_model),
            "student_top1": top1(student_model), "student_params": params(student_model), "teacher_params": params(teacher)}


def cnn_verdicts(section: dict) -> list[tuple[str, str, bool]]:
    fp32 = section["fp32_top1"]
    rows = [(f"digits static int8 ({name}), held-out: {acc:.2%} vs fp32 {base:.2%}", "within 0.5 points",
             base - acc <= 0.005) for name, (acc, base) in section["static_int8_top1"].items()]
    pd = section.get("prune_distill")
    if isinstance(pd, dict):
        rows.append((f"digits structured pruning ({pd['pruned_params'] / pd['teacher_params']:.0%} of params): {pd['pruned_top1']:.2%}",
                     "within 0.5 points", fp32 - pd["pruned_top1"] <= 0.005))
        share = pd["student_params"] / pd["teacher_params"]
        rows.append((f"digits distilled student ({share:.0%} of params): {pd['student_top1']:.2%}",
                     "<= 25% params, within 2 points", share <= 0.25 and fp32 - pd["student_top1"] <= 0.02))
    else:
        rows.append((f"pruning/distillation: {pd}", "measured", False))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--time-budget", type=float, default=300, help="seconds for leanserve optimize on MiniLM")
    parser.add_argument("--only", choices=["minilm", "cnn"])
    parser.add_argument("--out", default="bench-out/optimize_bench.json")
    parser.add_argument("--no-record", action="store_true", help="do not append the verdicts to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import onnxruntime
    import torch

    from machine import print_header, record

    from leanserve.measure import cpu_description

    header = print_header("optimize_bench")
    print(f"onnxruntime {onnxruntime.__version__}; torch {torch.__version__}")
    results, verdicts = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "minilm"):
            results["minilm"] = minilm_section(work, args.rounds, args.time_budget)
            print("\nMiniLM-L6, batch 1, sequence 64 (median of interleaved rounds):")
            for name, r in results["minilm"]["variants"].items():
                size = f"{r['size_mb']:.1f} MB" if r["size_mb"] else "-"
                print(f"  {name:<52} {r['median_ms']:7.3f} ms  cosine {r['cosine']:.4f}  {size}")
            verdicts += minilm_verdicts(results["minilm"])
        if args.only in (None, "cnn"):
            results["cnn"] = cnn_section(work)
            verdicts += cnn_verdicts(results["cnn"])
    lines = [f"{'figure':<61} {'target':<31} verdict",
             *(f"{figure:<61} {target:<31} {'PASS' if ok else 'FAIL'}" for figure, target, ok in verdicts)]
    print("\n" + "\n".join(lines))
    if not args.no_record:
        record(header, [f"onnxruntime {onnxruntime.__version__}; torch {torch.__version__}", *lines])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_description(), "results": results}, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
