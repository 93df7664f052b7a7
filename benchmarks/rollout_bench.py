"""Guarded rollout on simulated traffic: does ``judge`` promote an identical canary and roll back a worse one?

Traffic is simulated, not served: every guard tick (1 s, as the server's guard) a Poisson number of
requests arrives, split between primary and canary by the current step's share; each request fails with
the version's error rate, otherwise takes a lognormal latency, and a fraction of requests gets a label that
is correct with the version's accuracy (labels arrive at once: delay only shifts the timeline). The windows
are built as the guard builds them (the canary's since its step began, the primary's since the rollout
began, each capped at LiveStats' 20,000 events), accuracy counts accumulate over the rollout on top of the
primary's earlier labelled samples, and ``judge`` decides each tick with the default RolloutConfig.

Scenarios (issue 16): (a) identical canary, promoted in >= 19 of 20 seeds; (b) accuracy 3 points worse,
rolled back; (c) error rate 2 points worse, rolled back; (d) latency x2, rolled back. For each, how many
of the seeds ended promoted / rolled back / undecided (after --max-hours), and the medians (min-max) of the
canary's requests and labelled samples, all requests, and the simulated time each decision took.

Defaults of RolloutConfig were chosen on the tuning seeds (``--seed-set tuning``); the figures reported
come from the disjoint reporting seeds.

Run: .venv/bin/python benchmarks/rollout_bench.py [--seed-set reporting|tuning] [--set confidence=0.9 ...]
     [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.config import RolloutConfig
from leanserve.measure import cpu_description
from leanserve.monitor.live import window_stats
from leanserve.monitor.quality import QualityCounts
from leanserve.monitor.rollout import judge

SEED_SETS = {"tuning": list(range(0, 20)), "reporting": list(range(1000, 1020))}
MAX_EVENTS = 20_000  # LiveStats' per-version cap


@dataclass(frozen=True)
class Version:
    accuracy: float = 0.97
    error_rate: float = 0.005
    latency_median_ms: float = 5.0
    latency_sigma: float = 0.3  # of log-latency


@dataclass(frozen=True)
class Traffic:
    requests_per_s: float = 50.0
    label_fraction: float = 0.1  # share of requests whose true label comes back
    primary_labelled_before: int = 2000  # the primary's labelled samples from before the rollout
    tick_s: float = 1.0


SCENARIOS = {
    "(a) identical canary": (Version(), "promoted"),
    "(b) accuracy 3 points worse": (Version(accuracy=0.94), "rollback"),
    "(c) error rate 2 points worse": (Version(error_rate=0.025), "rollback"),
    "(d) latency x2": (Version(latency_median_ms=10.0), "rollback"),
}


@dataclass
class Arm:
    """One version's events in the current window and its labelled counts over the rollout."""

    latencies: list[np.ndarray] = dataclasses.field(default_factory=list)
    ok: list[np.ndarray] = dataclasses.field(default_factory=list)
    correct: int = 0
    labelled: int = 0

    def add(self, rng: np.random.Generator, version: Version, requests: int, label_fraction: float) -> None:
        self.ok.append(rng.random(requests) >= version.error_rate)
        self.latencies.append(version.latency_median_ms * np.exp(version.latency_sigma * rng.standard_normal(requests)))
        labelled = rng.binomial(requests, label_fraction)
        self.labelled += labelled
        self.correct += rng.binomial(labelled, version.accuracy)

    def window(self, span_s: float):
        latencies, ok = np.concatenate(self.latencies or [np.empty(0)]), np.concatenate(self.ok or [np.empty(0, bool)])
        if latencies.size > MAX_EVENTS:  # keep it from growing: one array of the newest events
            latencies, ok = latencies[-MAX_EVENTS:], ok[-MAX_EVENTS:]
        self.latencies, self.ok = [latencies], [ok]
        return window_stats(latencies, ok, span_s)


@dataclass(frozen=True)
class Outcome:
    action: str  # "promoted", "rollback" or "undecided"
    canary_requests: int
    canary_labelled: int
    all_requests: int
    minutes: float
    reason: str


def simulate(config: RolloutConfig, primary_v: Version, canary_v: Version, traffic: Traffic, seed: int,
             max_hours: float) -> Outcome:
    """One rollout, tick by tick, until promoted, rolled back or ``max_hours`` of simulated time."""
    rng = np.random.default_rng(seed)
    primary, canary = Arm(), Arm()
    prior = traffic.primary_labelled_before
    primary.labelled, primary.correct = prior, int(rng.binomial(prior, primary_v.accuracy))
    stage, stage_age, elapsed = 0, 0.0, 0.0
    canary_requests = all_requests = 0
    verdict = None
    while elapsed < max_hours * 3600:
        elapsed += traffic.tick_s
        stage_age += traffic.tick_s
        arriving = rng.poisson(traffic.requests_per_s * traffic.tick_s)
        to_canary = rng.binomial(arriving, config.steps[stage] / 100)
        canary.add(rng, canary_v, to_canary, traffic.label_fraction)
        primary.add(rng, primary_v, arriving - to_canary, traffic.label_fraction)
        canary_requests += to_canary
        all_requests += arriving
        verdict = judge(config, canary.window(stage_age), primary.window(elapsed), stage_age,
                        QualityCounts(canary.correct, canary.labelled), QualityCounts(primary.correct, primary.labelled))
        if verdict.action == "rollback":
            break
        if verdict.action == "advance":
            stage, stage_age = stage + 1, 0.0
            canary.latencies, canary.ok = [], []
            if stage == len(config.steps):
                break
    action = {"rollback": "rollback", "advance": "promoted"}.get(verdict.action if verdict else "", "undecided")
    return Outcome(action, canary_requests, canary.labelled, all_requests, elapsed / 60, verdict.reason if verdict else "")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(float(np.median(values)))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def run(config: RolloutConfig, traffic: Traffic, seeds: list[int], max_hours: float) -> list[str]:
    lines = ["| scenario | goal | promoted | rolled back | undecided | canary requests | canary labelled | all requests | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (canary_v, goal) in SCENARIOS.items():
        started = time.perf_counter()
        outcomes = [simulate(config, Version(), canary_v, traffic, seed, max_hours) for seed in seeds]
        hits = [o for o in outcomes if o.action == goal]
        count = {a: sum(o.action == a for o in outcomes) for a in ("promoted", "rollback", "undecided")}
        verdict = "PASS" if len(hits) >= len(seeds) - 1 else "FAIL"
        lines.append(f"| {name} | {goal} in >= {len(seeds) - 1} of {len(seeds)}: {verdict} | {count['promoted']} | "
                     f"{count['rollback']} | {count['undecided']} | {spread([o.canary_requests for o in hits])} | "
                     f"{spread([o.canary_labelled for o in hits])} | {spread([o.all_requests for o in hits])} | "
                     f"{spread([o.minutes for o in hits], '{:.1f}')} |")
        wrong = [o for o in outcomes if o.action != goal]
        example = (wrong or hits)[0]
        print(f"{name}: {len(outcomes)} rollouts in {time.perf_counter() - started:.1f} s; "
              f"{'a miss' if wrong else 'e.g.'}: {example.action} after {example.minutes:.1f} min: {example.reason[:300]}", flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-set", choices=sorted(SEED_SETS), default="reporting")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a RolloutConfig default, e.g. --set confidence=0.9")
    parser.add_argument("--max-hours", type=float, default=6.0, help="simulated time before a rollout counts as undecided")
    parser.add_argument("--results", type=Path, default=None, help="append the figures as a section of this Markdown file")
    args = parser.parse_args()
    overrides = {k: type(getattr(RolloutConfig(), k))(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = RolloutConfig(canary=2, primary=1, **overrides)
    traffic = Traffic()
    seeds = SEED_SETS[args.seed_set]
    cpu = cpu_description()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    date = datetime.date.today().isoformat()
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("canary", "primary", "stage")}
    header = [f"CPU: {cpu['model']} ({cpu['cores']} cores); commit {commit}; {date}",
              f"RolloutConfig: {settings}",
              f"traffic: {dataclasses.asdict(traffic)}; primary {dataclasses.asdict(Version())}",
              f"seeds used: {args.seed_set} {seeds[0]}-{seeds[-1]}; "
              f"tuning seeds {SEED_SETS['tuning'][0]}-{SEED_SETS['tuning'][-1]}, "
              f"reporting seeds {SEED_SETS['reporting'][0]}-{SEED_SETS['reporting'][-1]} (disjoint)",
              "medians (min-max) over the seeds that reached the goal"]
    for line in header:
        print(line)
    table = run(config, traffic, seeds, args.max_hours)
    print("\n".join(table))
    if args.results:
        section = [f"\n## rollout_bench ({date})\n", *[f"- {line}" for line in header], "", *table, ""]
        with args.results.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(section) + "\n")


if __name__ == "__main__":
    main()
