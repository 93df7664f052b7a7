"""Federated learning on non-IID digits with Flower: rounds until the global model is within 2 points of the
same CNN trained centrally, FedAvg beside FedProx, and what differential privacy costs in accuracy.

10 simulated clients (Flower's simulation engine), partitions Dirichlet(alpha 0.5) and two classes per
client, the default settings of ``leanserve federate`` (server momentum 0.9 included), and FedAvg with plain
averaging (server momentum 0) for reference. Goals: <= 25 rounds (Dirichlet), <= 40 (two classes). Prints
the CPU with the figures and writes a per-round accuracy plot (PNG) and JSON.

    python benchmarks/federated_bench.py [--out federated_bench.png] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from leanserve.demo import build_cnn, digits_dataset, train_cnn
from leanserve.from_torch import export
from leanserve.learn import federated
from leanserve.learn.federated_server import RoundSettings, evaluate_module
from leanserve.learn.partition import by_class, dirichlet
from leanserve.measure import cpu_description
from leanserve.repository import Repository
from leanserve.torch_source import save_source

GOALS = {"dirichlet": 25, "two-class": 40}
PARTITIONS = {"dirichlet": lambda y, k, seed=0: dirichlet(y, k, seed, alpha=0.5),
              "two-class": lambda y, k, seed=0: by_class(y, k, seed, classes_per_client=2)}


def untrained_repo(root: Path) -> Repository:
    """A repository whose version 1 is the demo CNN, freshly initialised, with its PyTorch source."""
    torch.manual_seed(0)
    module, example = build_cnn().eval(), torch.zeros(2, 1, 28, 28)
    export(module, example, root / "cnn.onnx", input_names=["image"], output_names=["logits"])
    repo = Repository(root / "repo")
    repo.add(root / "cnn.onnx", "cnn", attachments=[save_source(module, example, root)])
    return repo


def rounds_to_target(curve: list[float], target: float) -> int | None:
    return next((r for r, acc in enumerate(curve) if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="federated_bench.png")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not the figures)")
    parser.add_argument("--dp", default="5.0,0.01", help="CLIP,NOISE for the DP run")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    x_train, x_test, y_train, y_test = digits_dataset()
    central, _ = evaluate_module(train_cnn(x_train, y_train, progress=False), x_test, y_test)
    target = central - 0.02
    # Clients share the training split; the server evaluates on the test split (eval_fraction picks it out).
    data = federated.TrainingData("image", np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))
    eval_fraction = len(y_test) / len(data.y)
    print(f"CPU: {cpu_description()}")
    print(f"central CNN (15 epochs, Adam): {central:.4f}; target {target:.4f}")

    plain = {"server_momentum": 0.0}
    runs = ([(p, s, None, {}) for p in PARTITIONS for s in ("fedavg", "fedprox")] + [("dirichlet", "fedavg", args.dp, {})]
            + [(p, "fedavg", None, plain) for p in PARTITIONS])
    results = []
    for partition, strategy, dp, changes in runs:
        rounds = 3 if args.quick else GOALS[partition] + 5
        settings = federated.with_dp(replace(RoundSettings(), strategy=strategy, rounds=rounds, clients=10, **changes), dp)
        label = strategy + (" (server momentum 0)" if changes else "")
        with tempfile.TemporaryDirectory() as tmp:
            repo = untrained_repo(Path(tmp))
            start = time.perf_counter()
            result = federated.federate(repo, "cnn", settings, data, partition=PARTITIONS[partition],
                                        eval_fraction=eval_fraction, register=False)
            seconds = time.perf_counter() - start
        reached = rounds_to_target(result.accuracy, target)
        results.append({"partition": partition, "strategy": label, "dp": dp, "rounds_to_target": reached,
                        "goal": GOALS[partition], "final_accuracy": result.accuracy[-1], "curve": result.accuracy,
                        "seconds": round(seconds, 1)})
        print(f"{partition:<10} {label:<28} dp={dp or '-':<10} rounds to target: {reached or '>' + str(rounds):<5} "
              f"(goal {GOALS[partition]})  final {result.accuracy[-1]:.4f}  {seconds:.0f} s", flush=True)
    plot(results, target, Path(args.out))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"cpu": cpu_description(), "central": central,
                                                                "target": target, "runs": results}, indent=2))


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, partition in zip(axes, PARTITIONS):
        for run in (r for r in results if r["partition"] == partition):
            label = run["strategy"] + (f" + DP {run['dp']}" if run["dp"] else "")
            ax.plot(range(len(run["curve"])), run["curve"], label=label)
        ax.axhline(target, color="grey", linestyle="--", label="central - 2 points")
        ax.set(title=f"{partition} (10 clients)", xlabel="round", ylim=(0, 1))
        ax.legend()
    axes[0].set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
