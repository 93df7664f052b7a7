"""Online learning under concept shift on digits: OGD and Hedge Backpropagation against the frozen model.

A 64-128-64-10 MLP is trained on half of scikit-learn's 8x8 digits; the other half is streamed one sample
at a time (shuffled passes), and after ``--before`` samples the concept shifts: a fixed 3-label
permutation, and separately images rotated by 90 degrees. Each model predicts every sample before it
learns from it (prequential, test-then-train); accuracy is over a sliding window of 200 samples.
"Recovery" is the number of samples after the shift until that window, past its lowest point, is back
within 2 points of its level just before the shift (counted from the shift; "never" if it is not).
Goals (issue 9): label swap <= 250 samples, rotation <= 900, with the learner's default settings.

Run: .venv/bin/python benchmarks/learn_bench.py [--before 1000] [--after 3000] [--plot learn_bench.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanserve.demo import digits_dataset
from leanserve.learn.online import OnlineConfig, OnlineLearner
from leanserve.measure import cpu_description

WINDOW = 200
TOLERANCE = 0.02
SWAP = {3: 5, 5: 8, 8: 3}  # the 3-label permutation
GOALS = {"label swap": 250, "rotation 90°": 900}


def train_mlp(x: np.ndarray, y: np.ndarray, epochs: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), 32):
            idx = order[start:start + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def make_stream(x: np.ndarray, y: np.ndarray, before: int, after: int, shift: str, seed: int = 0):
    """``before + after`` samples as shuffled passes over (x, y); the concept shifts after ``before``."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range((before + after) // len(x) + 1)])[:before + after]
    xs, ys = x[order].copy(), y[order].copy()
    if shift == "label swap":
        ys[before:] = [SWAP.get(int(label), int(label)) for label in ys[before:]]
    else:
        xs[before:] = np.rot90(xs[before:], k=1, axes=(2, 3))
    return np.ascontiguousarray(xs), ys


def run(model: nn.Module, algorithm: str | None, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Prequential correctness (0/1) per sample; ``algorithm`` None is the frozen model."""
    tensors = torch.from_numpy(xs)
    if algorithm is None:
        with torch.no_grad():
            return (model(tensors).argmax(dim=1).numpy() == ys).astype(np.float64)
    learner = OnlineLearner(copy.deepcopy(model), (tensors[:1],), OnlineConfig(algorithm=algorithm))
    return np.array([learner.learn_one((tensors[i:i + 1],), int(ys[i])) for i in range(len(ys))], dtype=np.float64)


def window_accuracy(correct: np.ndarray) -> np.ndarray:
    """Accuracy over the last WINDOW samples at each step (over what there is for the first ones)."""
    sums = np.cumsum(np.concatenate([[0.0], correct]))
    ends = np.arange(1, len(correct) + 1)
    starts = np.maximum(ends - WINDOW, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def recovery(curve: np.ndarray, before: int) -> tuple[float, int | None]:
    """(pre-shift level, samples after the shift until the window, past its lowest point, is back within
    TOLERANCE of that level; None if it never is). Counting from the lowest point keeps a noise wobble
    just after the shift, before the errors pile up in the window, from passing for a recovery."""
    level = float(curve[before - 1])
    after = curve[before:]
    lowest = int(np.argmin(after))
    back = np.flatnonzero(after[lowest:] >= level - TOLERANCE)
    return level, (int(lowest + back[0] + 1) if len(back) else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=int, default=1000, help="samples before the shift")
    parser.add_argument("--after", type=int, default=3000, help="samples after the shift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="learn_bench.png", help="PNG of the curves")
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one sample at a time: threads only add synchronisation

    x_train, x_stream, y_train, y_stream = digits_dataset(size=8, test_fraction=0.5, seed=args.seed)
    model = train_mlp(x_train, y_train, seed=args.seed)
    print(f"CPU: {json.dumps(cpu_description())}")
    print(f"64-128-64-10 MLP trained on {len(x_train)} digits; stream of {args.before} + {args.after} samples "
          f"drawn from the other {len(x_stream)}; window {WINDOW}; recovery = back within {TOLERANCE * 100:.0f} points")
    print(f"defaults: OGD {OnlineConfig(algorithm='ogd')}\n          HBP {OnlineConfig(algorithm='hbp')}\n")
    results, curves = {}, {}
    print(f"{'shift':<14}{'model':<8}{'pre-shift':>10}{'lowest':>8}{'end':>7}{'recovery':>10}{'goal':>7}{'s/1k':>7}")
    for shift in GOALS:
        xs, ys = make_stream(x_stream, y_stream, args.before, args.after, shift, seed=args.seed)
        for name, algorithm in (("frozen", None), ("OGD", "ogd"), ("HBP", "hbp")):
            started = time.perf_counter()
            curve = window_accuracy(run(model, algorithm, xs, ys))
            seconds = time.perf_counter() - started
            level, samples = recovery(curve, args.before)
            curves[(shift, name)] = curve
            results[f"{shift} / {name}"] = {"pre_shift": level, "lowest": float(curve[args.before:].min()),
                                            "end": float(curve[-1]), "recovery_samples": samples}
            met = "" if algorithm is None else ("met" if samples is not None and samples <= GOALS[shift] else "MISSED")
            print(f"{shift:<14}{name:<8}{level:>10.3f}{curve[args.before:].min():>8.3f}{curve[-1]:>7.3f}"
                  f"{'never' if samples is None else samples:>10}{met:>7}{seconds / len(ys) * 1000:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "results": results}, indent=2))
    plot(curves, args.before, args.plot)
    print(f"\ncurves: {args.plot}")


def plot(curves: dict, before: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GOALS), figsize=(12, 4), sharey=True)
    for ax, shift in zip(axes, GOALS):
        for (s, name), curve in curves.items():
            if s == shift:
                ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
        ax.axvline(before, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{shift} after sample {before}")
        ax.set_xlabel("samples streamed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"prequential accuracy (window {WINDOW})")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
