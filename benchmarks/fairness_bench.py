"""Fairness mitigation side by side: the constraint's gap and accuracy before and after Fairlearn's
ThresholdOptimizer, served as a post-processed version, on two data sets.

- diabetes: scikit-learn's bundled data, group = sex, label = target above its median; the served
  model is a logistic regression on all 442 rows, and the figures are held out from each threshold
  rule by the mitigation report's 5-fold cross-fitting (too few rows for separate test data).
- synthetic: a logistic model that adds +1.5 to one group's logit (bias injected on purpose), fitted on
  3000 labelled predictions and measured on 4000 fresh rows through the post-processed engine.

Run: .venv/bin/python benchmarks/fairness_bench.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fairness"))

from test_fairness import SYNTHETIC_BIAS, diabetes, feedback_of, mitigated_decisions, served, synthetic  # noqa: E402

from leanserve import Repository, load  # noqa: E402
from leanserve.fairness.metrics import fairness_report  # noqa: E402
from leanserve.fairness.mitigate import mitigate  # noqa: E402
from leanserve.measure import cpu_description  # noqa: E402

CONSTRAINTS = ("demographic_parity", "equalized_odds")


def row(data: str, constraint: str, gap_before: float, gap_after: float, acc_before: float, acc_after: float,
        seconds: float) -> str:
    ratio = gap_after / gap_before if gap_before else float("nan")
    return (f"| {data} | {constraint} | {gap_before:.3f} | {gap_after:.3f} | {ratio:.2f}x | {acc_before:.3f} | "
            f"{acc_after:.3f} | {acc_before - acc_after:+.3f} | {seconds:.2f} |")


def bench_diabetes(constraint: str, root: Path) -> str:
    from sklearn.linear_model import LogisticRegression

    x, labels, groups = diabetes()
    repo = Repository(root / f"diabetes-{constraint}")
    fitted = LogisticRegression(max_iter=2000).fit(x, labels)
    served(repo, root, "diabetes", fitted.coef_[0].astype(np.float32), float(fitted.intercept_[0]))
    started = time.perf_counter()
    report = mitigate(repo, "diabetes", constraint=constraint, canary=False,
                      feedback=feedback_of(load("diabetes", repo=repo), x, labels, groups))
    seconds = time.perf_counter() - started
    return row("diabetes (442, 5-fold held out)", constraint, report.gap_before, report.gap_after,
               report.before.accuracy, report.after.accuracy, seconds)


def bench_synthetic(constraint: str, root: Path) -> str:
    repo = Repository(root / f"synthetic-{constraint}")
    served(repo, root, "credit", SYNTHETIC_BIAS)
    base = load("credit", repo=repo)
    started = time.perf_counter()
    report = mitigate(repo, "credit", constraint=constraint, canary=False, feedback=feedback_of(base, *synthetic(3000, seed=2)))
    seconds = time.perf_counter() - started
    x, labels, groups = synthetic(4000, seed=3)
    before = fairness_report(labels, base.predict({"x": x})["logits"].argmax(axis=1), groups)
    after = fairness_report(labels, mitigated_decisions(load("credit", report.version, repo=repo), x, groups), groups)
    return row("synthetic (3000 fit, 4000 test)", constraint, report.gap_of(before), report.gap_of(after),
               before.accuracy, after.accuracy, seconds)


def main() -> None:
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    print("goal: the chosen constraint's gap at most 0.5x its value before, on held-out data\n")
    print("| data | constraint | gap before | gap after | after/before | accuracy before | accuracy after | "
          "accuracy cost | mitigate s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="fairness-bench-") as tmp:
        for constraint in CONSTRAINTS:
            print(bench_diabetes(constraint, Path(tmp)))
        for constraint in CONSTRAINTS:
            print(bench_synthetic(constraint, Path(tmp)))


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    run_recorded("fairness_bench", main)
