"""Online learning under concept shift on digits: OGD and Hedge Backpropagation against the frozen model.

A 64-128-64-10 MLP is trained on half of scikit-learn's 8x8 digits; the other half is streamed one sample
at a time (shuffled passes), and after ``--before`` samples the concept shifts: a fixed 3-label
permutation, and separately images rotated by 90 degrees. Each model predicts every sample before it
learns from it (prequential, test-then-train); accuracy is over a sliding window of 200 samples.
"Recovery" is the number of samples after the shift until that window, past its lowest point, is back
within 2 points of its level just before the shift (counted from the shift; "never" if it is not).
Goals (issue 9): label swap <= 250 samples, rotation <= 900, with the learner's default settings.

Each seed draws its own digits split, MLP, stream order and replay draws; the table gives medians over the
seeds and the spread of the recovery, and a learner's row PASSes when its median recovery meets the goal.

The learners' defaults (OGD's learning rate 0.04) were tuned on seeds 0-49 (TUNING_SEEDS); the report runs
on seeds from 100 on, which tuned nothing, and says so when asked to run on tuning seeds.

Run: .venv/bin/python benchmarks/learn_bench.py [--seeds 20] [--first-seed 100] [--before 1000] [--after 3000]
     [--plot learn_bench.png] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanserve.demo import digits_dataset
from leanserve.learn.online import OnlineConfig, OnlineLearner
from leanserve.measure import cpu_description

from machine import print_header, record  # benchmarks/ (the script's folder) is on sys.path

WINDOW = 200
TOLERANCE = 0.02
SWAP = {3: 5, 5: 8, 8: 3}  # the 3-label permutation
GOALS = {"label swap": 250, "rotation 90°": 900}
TUNING_SEEDS = range(0, 50)  # the seeds OGD's default learning rate (0.04) was chosen on
REPORTING_SEEDS_FROM = 100  # default first reporting seed: well clear of the tuning seeds
MIN_REPORTING_SEEDS = 20


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


def run(model: nn.Module, algorithm: str | None, xs: np.ndarray, ys: np.ndarray, seed: int = 0) -> np.ndarray:
    """Prequential correctness (0/1) per sample; ``algorithm`` None is the frozen model. The learner has its
    default settings; only its seed (the replay draws) follows the benchmark's."""
    tensors = torch.from_numpy(xs)
    if algorithm is None:
        with torch.no_grad():
            return (model(tensors).argmax(dim=1).numpy() == ys).astype(np.float64)
    learner = OnlineLearner(copy.deepcopy(model), (tensors[:1],), OnlineConfig(algorithm=algorithm, seed=seed))
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


MODELS = (("frozen", None), ("OGD", "ogd"), ("HBP", "hbp"))


def run_seed(seed: int, before: int, after: int) -> dict:
    """{(shift, model): (window curve, seconds per 1,000 samples)} for one seed, which draws the digits
    split, the MLP's initialisation and batches, the stream's order and the learner's replay."""
    x_train, x_stream, y_train, y_stream = digits_dataset(size=8, test_fraction=0.5, seed=seed)
    model = train_mlp(x_train, y_train, seed=seed)
    out = {}
    for shift in GOALS:
        xs, ys = make_stream(x_stream, y_stream, before, after, shift, seed=seed)
        for name, algorithm in MODELS:
            started = time.perf_counter()
            curve = window_accuracy(run(model, algorithm, xs, ys, seed=seed))
            out[(shift, name)] = (curve, (time.perf_counter() - started) / len(ys) * 1000)
    return out


def summarise(per_seed: list[dict], before: int) -> dict:
    """Per (shift, model): each seed's pre-shift level, lowest and last window accuracy, and recovery."""
    rows = {}
    for key in per_seed[0]:
        figures = []
        for runs in per_seed:
            curve, seconds_per_1k = runs[key]
            level, samples = recovery(curve, before)
            figures.append({"pre_shift": level, "lowest": float(curve[before:].min()), "end": float(curve[-1]),
                            "recovery_samples": samples, "s_per_1k": seconds_per_1k})
        rows[key] = figures
    return rows


def _spread(values: list) -> str:
    """Median [min-max] of recovery counts; a run that never recovers counts as the largest."""
    ranked = sorted(math.inf if v is None else v for v in values)
    if math.isinf(ranked[0]):
        return "never"
    shown = ["never" if math.isinf(v) else f"{v:.0f}" for v in (np.median(ranked), ranked[0], ranked[-1])]
    return f"{shown[0]} [{shown[1]}-{shown[2]}]"


def print_table(rows: dict, seeds: list[int]) -> list[str]:
    """Print the table; returns its lines (for RESULTS.md)."""
    lines = [f"{'shift':<14}{'model':<8}{'pre-shift':>10}{'lowest':>8}{'end':>7}  {'recovery median [min-max]':<27}"
             f"{'seeds in goal':>14}{'goal':>10}{'s/1k':>7}"]
    for (shift, name), figures in rows.items():
        med = {k: float(np.median([f[k] for f in figures])) for k in ("pre_shift", "lowest", "end", "s_per_1k")}
        samples = [f["recovery_samples"] for f in figures]
        within = sum(s is not None and s <= GOALS[shift] for s in samples)
        median = float(np.median([math.inf if s is None else s for s in samples]))
        verdict = "" if name == "frozen" else ("PASS" if median <= GOALS[shift] else "FAIL")
        goal = f"{verdict} ≤{GOALS[shift]}" if verdict else ""
        lines.append(f"{shift:<14}{name:<8}{med['pre_shift']:>10.3f}{med['lowest']:>8.3f}{med['end']:>7.3f}  "
                     f"{_spread(samples):<27}{'' if name == 'frozen' else f'{within}/{len(seeds)}':>14}{goal:>10}"
                     f"{med['s_per_1k']:>7.2f}")
    print("\n".join(lines))
    return lines


def _ranges(seeds) -> str:
    seeds = sorted(seeds)
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=int, default=1000, help="samples before the shift")
    parser.add_argument("--after", type=int, default=3000, help="samples after the shift")
    parser.add_argument("--seeds", type=int, default=MIN_REPORTING_SEEDS,
                        help="runs, with seeds FIRST_SEED, FIRST_SEED + 1, ... (a report needs at least 20)")
    parser.add_argument("--first-seed", type=int, default=REPORTING_SEEDS_FROM,
                        help=f"first seed (default {REPORTING_SEEDS_FROM}; seeds {_ranges(TUNING_SEEDS)} tuned the defaults)")
    parser.add_argument("--no-record", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    parser.add_argument("--plot", default="learn_bench.png", help="PNG of the curves (mean over the seeds)")
    parser.add_argument("--json", help="also write every seed's figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one sample at a time: threads only add synchronisation

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    header = print_header("learn_bench")
    tuned_on = sorted(set(seeds) & set(TUNING_SEEDS))
    seeds_line = (f"tuning seeds (chose the defaults): {_ranges(TUNING_SEEDS)}; reporting seeds: {_ranges(seeds)}"
                  + (f" -- IN-SAMPLE: {len(tuned_on)} of them tuned the defaults" if tuned_on else
                     " (none used for tuning)")
                  + (f" -- only {len(seeds)}, a report needs {MIN_REPORTING_SEEDS}" if len(seeds) < MIN_REPORTING_SEEDS else ""))
    print(seeds_line)
    print(f"64-128-64-10 MLP trained on half of the digits, the other half streamed: {args.before} + {args.after} "
          f"samples; window {WINDOW}; recovery = back within {TOLERANCE * 100:.0f} points")
    print(f"defaults: OGD {OnlineConfig(algorithm='ogd')}\n          HBP {OnlineConfig(algorithm='hbp')}\n")
    per_seed = []
    for seed in seeds:
        per_seed.append(run_seed(seed, args.before, args.after))
        print(f"seed {seed} done", flush=True)
    rows = summarise(per_seed, args.before)
    print(f"\nmedians over {len(seeds)} seeds; a row PASSes when its median recovery meets the goal\n")
    lines = print_table(rows, seeds)
    if not args.no_record:
        record(header, [seeds_line, f"{args.before} + {args.after} samples, window {WINDOW}", *lines])
    if args.json:
        results = {f"{shift} / {name}": dict(zip(map(str, seeds), figures)) for (shift, name), figures in rows.items()}
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "seeds": seeds, "results": results}, indent=2))
    plot({key: np.mean([runs[key][0] for runs in per_seed], axis=0) for key in per_seed[0]}, args.before, args.plot,
         len(seeds))
    print(f"\ncurves (mean over the seeds): {args.plot}")


def plot(curves: dict, before: int, path: str, seeds: int) -> None:
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
    axes[0].set_ylabel(f"prequential accuracy (window {WINDOW}), mean of {seeds} seeds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
