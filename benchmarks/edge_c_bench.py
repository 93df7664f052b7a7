"""Microcontroller C artifacts (issue 20), measured in one run on this machine.

For the digits CNN (10 epochs, as edge_bench) and a 30-16-2 MLP on scikit-learn's breast cancer data:
``leanserve edge --target c --profile cortex-m4`` with held-out evaluation (70% selection / 30% held-out,
seed 0), then flash, RAM, scratch peak, instructions per inference on QEMU mps2-an386, held-out top-1 of
fp32 vs the C int8 build, agreement with ONNX Runtime's int8, and the sizes beside the ORT-format and
ExecuTorch (.pte) artifacts of the same model. Prints CPU, commit and date first; --markdown appends the
figures to benchmarks/RESULTS.md.

    python benchmarks/edge_c_bench.py [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def header() -> list[str]:
    from leanserve.measure import cpu_description

    cpu = cpu_description()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=HERE).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"- CPU: {cpu['model']} ({cpu['cores']} cores; flags: {', '.join(cpu['flags']) or 'none'})",
            f"- commit: {commit}{'+dirty' if dirty else ''}; {now}"]


def cnn_model(work: Path):
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.torch_source import save_program

    x_train, x_test, y_train, y_test = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=10, progress=False)
    export(module, torch.from_numpy(x_test[:2]), work / "cnn.onnx", input_names=["image"], output_names=["logits"])
    program = save_program(module, torch.from_numpy(x_test[:2]), work)
    np.savez(work / "cnn-eval.npz", image=x_test, labels=y_test)
    return work / "cnn.onnx", work / "cnn-eval.npz", [program] if program else []


def mlp_model(work: Path):
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from leanserve.from_torch import export
    from leanserve.torch_source import save_program

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    x_train, x_test = ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(torch.from_numpy(x_train)), torch.from_numpy(y_train)).backward()
        optimizer.step()
    module.eval()
    example = torch.from_numpy(x_test[:2])
    export(module, example, work / "mlp.onnx", input_names=["features"], output_names=["logits"])
    program = save_program(module, example, work)
    np.savez(work / "mlp-eval.npz", features=x_test, labels=y_test.astype(np.int64))
    return work / "mlp.onnx", work / "mlp-eval.npz", [program] if program else []


def measure(name: str, work: Path, build) -> list[str]:
    import leanserve
    from leanserve.deploy.edge.build import build_edge
    from leanserve.deploy.edge.c.build import build_c_edge

    folder = work / name
    folder.mkdir()
    onnx_path, eval_path, attachments = build(folder)
    repo = leanserve.Repository(folder / "repo")
    repo.add(onnx_path, name, attachments=attachments)
    c = build_c_edge(repo, name, 1, eval_path=eval_path, max_drop="1%").report
    original = onnx_path.stat().st_size
    lines = [f"### {name}: {c.macs:,} MACs per inference, fp32 ONNX {original:,} bytes", ""]
    h, a, f, q = c.holdout, c.agreement, c.footprint, c.qemu
    lines.append(f"- held-out top-1 ({h.rows} rows; {c.split}): fp32 {h.fp32:.4f}, C int8 {h.c_int8:.4f}, "
                 f"ONNX Runtime int8 {h.ort_int8:.4f}; drop {h.drop * 100:+.2f} points (goal <= 1 point: "
                 f"{'PASS' if h.drop <= 0.01 + 1e-12 else 'FAIL'})")
    lines.append(f"- C int8 vs ONNX Runtime int8 on the held-out rows: same top-1 on {a.top1_agreement:.2%} "
                 f"(goal >= 99.5%: {'PASS' if a.top1_agreement >= 0.995 else 'FAIL'}); largest output difference "
                 f"{a.max_diff_steps:g} quantization steps")
    lines.append(f"- scratch arena: {c.scratch_bytes:,} bytes (peak of live buffers {c.scratch_live_peak_bytes:,}; "
                 f"{c.scratch_unshared_bytes:,} unshared)")
    if f is None:
        lines.append("- Cortex-M4: not measured (gcc-arm-none-eabi / qemu-system-arm missing)")
    else:
        lines.append(f"- Cortex-M4 (-mcpu=cortex-m4 -mthumb -Os, minimal firmware): flash {f.flash_bytes:,} of "
                     f"{c.profile.flash_bytes:,} bytes, RAM {f.ram_bytes:,} of {c.profile.ram_bytes:,} bytes (stack "
                     f"{f.stack_bytes}): fits {'PASS' if c.fits else 'FAIL'}")
        lines.append(f"- QEMU mps2-an386, -icount: {q.instructions_per_inference:,} instructions per inference "
                     f"({q.instructions_per_inference / c.macs:.1f} per MAC); {q.rows} rows identical to the host "
                     f"build: {'PASS' if q.max_abs_diff == 0 else f'FAIL (max diff {q.max_abs_diff:g})'}")
    ort = build_edge(repo, name, 1, target="ort", eval_path=eval_path, probe_time_s=0.2).report
    sizes = [("ONNX fp32", original), (f"ORT format ({ort.recipe})", ort.artifact_bytes)]
    if importlib.util.find_spec("executorch") is not None and attachments:
        pte = build_edge(repo, name, 1, target="executorch", eval_path=eval_path, probe_time_s=0.2).report
        sizes.append((f"ExecuTorch .pte ({pte.recipe.split(' (')[0]})", pte.artifact_bytes))
    else:
        sizes.append(("ExecuTorch .pte", None))
    if f is not None:
        sizes.append(("C int8, model + kernels compiled (text + rodata)", f.model_text_bytes))
        sizes.append(("C int8, minimal firmware flash", f.flash_bytes))
    lines += ["", "| artifact | bytes | of fp32 |", "|---|---|---|"]
    lines += [f"| {label} | {size:,} | {size / original:.1%} |" if size else f"| {label} | n/a | |"
              for label, size in sizes]
    lines.append("")
    lines.append("(ORT format and .pte also need their runtime on the device: hundreds of KB, not counted here; "
                 "the C firmware figure is everything that is flashed.)")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lines = header()
    print("\n".join(lines))
    with tempfile.TemporaryDirectory(prefix="edge-c-bench-") as tmp:
        for name, build in (("cnn", cnn_model), ("mlp", mlp_model)):
            section = measure(name, Path(tmp), build)
            print("\n" + "\n".join(section))
            lines += ["", *section]
    if args.markdown:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write("\n## edge_c_bench (microcontroller C target, issue 20)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
