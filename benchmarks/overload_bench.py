"""Overload check (issue 17, "Done when" 1 and 2): does ``leanserve serve`` shed load without losing
goodput, and does one large wrong body leave everyone else alone?

Builds the digits CNN (input 1x1x28x28 floats) as benchmarks/serve_bench.py does, serves it with
defaults, and loads it with benchmarks/http_load.py (a closed-loop Python client recording status,
latency and Retry-After per response; wrk cannot give latency per status):

1. Unloaded capacity: 16 connections, JSON; accepted (200) req/s is the reference for the ratios.
2. 256 and 2,500 connections: counts of each status (only 200 and 503 allowed, every 503 with
   Retry-After), accepted req/s as a share of the capacity (target >= 80%), accepted p50/p99 (target
   p99 <= 250 ms), rejected p50. 2,500 connections use two generator processes.
3. On a fresh server: 8 connections alone, then beside one client looping a ~60 MB valid V2 JSON body
   whose declared shape is wrong for the model. The 8 connections' req/s with the looper as a share of
   without (target >= 80%), the looper's statuses and latency, and the server's RSS (VmRSS every
   0.2 s) idle vs peak (target peak < 2x idle).

The load generator runs in its own processes on the same cores as the server: its CPU use is printed
beside each figure, and on a 2-core machine it takes a large share. Status counts and latencies are of
the requests *sent* in the measured window (answered within the grace period after it); req/s counts
answers *received* in the window. Prints the machine first, PASS/FAIL per target, appends the figures
to benchmarks/RESULTS.md (unless ``--no-record``). The exit status is 0 whatever the figures.

    .venv/bin/python benchmarks/overload_bench.py [--duration 10] [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

import leanserve
from serve_bench import CNN, Check, OtherLoad, Server, build_cnn, print_checks, process_cpu_s, write_bodies

HERE = Path(__file__).resolve().parent
HTTP_LOAD = HERE / "http_load.py"
CONNECTIONS_PER_PROCESS = 1250  # more connections than this get a second generator process
RAMP_PER_100MS = 500  # connections opened per 100 ms, all generator processes together
PROCESS_START_S = 1.5  # time a generator process gets to start before its first connection
LOOPER_BODY_BYTES = 60_000_000
RSS_INTERVAL_S = 0.2
INFER_PATH = f"/v2/models/{CNN}/infer"


@dataclass(frozen=True)
class Options:
    duration_s: float
    warmup_s: float
    grace_s: float
    overload_connections: tuple[int, ...]
    record: bool
    quick: bool


@dataclass(frozen=True)
class LoadFigures:
    """One load run, from every generator process's records. Latencies in ms."""

    connections: int
    duration_s: float
    statuses: dict[int, int]  # requests sent in the window by status; 0: socket error, -1: unanswered
    accepted_per_s: float  # 200s received in the window, per second
    accepted_p50_ms: float
    accepted_p99_ms: float
    rejected_p50_ms: float  # 503s
    rejected_without_retry_after: int
    generator_cores: float  # mean cores the generator processes used during the window
    server_cores: float
    other_cores: float  # CPU of unrelated processes over the whole run: > 0.1 spoils the figures
    connects: int
    connect_errors: int

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def unexpected(self) -> int:
        """Requests answered with anything but 200 or 503, or not answered."""
        return sum(n for status, n in self.statuses.items() if status not in (200, 503))

    def describe(self) -> str:
        statuses = ", ".join(f"{_status_name(s)}: {n}" for s, n in sorted(self.statuses.items(), key=lambda i: -i[1]))
        return (f"c={self.connections}: {self.accepted_per_s:.0f} accepted req/s, accepted p50 {self.accepted_p50_ms:.1f} ms "
                f"p99 {self.accepted_p99_ms:.1f} ms, rejected p50 {self.rejected_p50_ms:.1f} ms; {statuses}; "
                f"503 without Retry-After: {self.rejected_without_retry_after}; CPU: server {self.server_cores:.2f}, "
                f"load generator {self.generator_cores:.2f}, other {self.other_cores:.2f} cores; "
                f"{self.connects} connects, {self.connect_errors} failed")


def _status_name(status: int) -> str:
    return {0: "socket error", -1: "unanswered"}.get(status, str(status))


def _percentile_ms(seconds: np.ndarray, q: float) -> float:
    return float(np.percentile(seconds, q) * 1000) if len(seconds) else float("nan")


def summarize(records: dict[str, np.ndarray], duration_s: float) -> dict:
    """Status counts and latencies of the requests sent in [0, duration_s), and the 200s received in it
    per second, from http_load records (times relative to the window's start)."""
    sent, done, status, retry = records["sent"], records["done"], records["status"], records["retry_after"]
    in_window = (sent >= 0) & (sent < duration_s)
    latency = done - sent
    accepted = in_window & (status == 200)
    rejected = in_window & (status == 503)
    values, counts = np.unique(status[in_window], return_counts=True)
    return {
        "statuses": {int(v): int(n) for v, n in zip(values, counts)},
        "accepted_per_s": int(np.count_nonzero((status == 200) & (done >= 0) & (done < duration_s))) / duration_s,
        "accepted_p50_ms": _percentile_ms(latency[accepted], 50),
        "accepted_p99_ms": _percentile_ms(latency[accepted], 99),
        "rejected_p50_ms": _percentile_ms(latency[rejected], 50),
        "rejected_without_retry_after": int(np.count_nonzero(rejected & ~retry)),
    }


# --- running the load generator --------------------------------------------------------------------

class Generators:
    """http_load.py processes sharing ``connections`` and one measured window (wall clock), started now."""

    def __init__(self, port: int, body: Path, connections: int, opts: Options, folder: Path, label: str,
                 start_at: float | None = None) -> None:
        processes = math.ceil(connections / CONNECTIONS_PER_PROCESS)
        ramp_s = math.ceil(connections / RAMP_PER_100MS) * 0.1
        self.start_at = start_at or time.time() + PROCESS_START_S
        self.window = (self.start_at + ramp_s + opts.warmup_s, self.start_at + ramp_s + opts.warmup_s + opts.duration_s)
        self.connections, self.duration_s = connections, opts.duration_s
        self.outs = [folder / f"{label}-{i}.npz" for i in range(processes)]
        shares = [connections // processes + (i < connections % processes) for i in range(processes)]
        self.processes = [subprocess.Popen(
            [sys.executable, str(HTTP_LOAD), "--port", str(port), "--path", INFER_PATH, "--body", str(body),
             "--connections", str(share), "--ramp-per-100ms", str(max(1, RAMP_PER_100MS // processes)),
             "--start-at", repr(self.start_at), "--window-start", repr(self.window[0]),
             "--window-end", repr(self.window[1]), "--grace", str(opts.grace_s), "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for share, out in zip(shares, self.outs)]

    def wait(self) -> tuple[dict[str, np.ndarray], dict]:
        """The records of every process, concatenated, and their summaries added up. Exits if one failed."""
        summary: dict = {}
        for process in self.processes:
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                sys.exit(f"http_load.py failed (exit code {process.returncode}):\n{stderr[-3000:]}")
            for key, value in json.loads(stdout.strip().splitlines()[-1]).items():
                summary[key] = summary.get(key, 0) + value
        parts = [np.load(out) for out in self.outs]
        records = {key: np.concatenate([part[key] for part in parts]) for key in parts[0].files}
        return records, summary


def sleep_until(wall_time: float) -> None:
    time.sleep(max(0.0, wall_time - time.time()))


def load_run(server: Server, body: Path, connections: int, opts: Options, folder: Path, label: str) -> LoadFigures:
    """One closed-loop run of ``connections`` clients POSTing ``body``; the server's CPU over the window."""
    other = OtherLoad((server.process.pid,))
    generators = Generators(server.port, body, connections, opts, folder, label)
    sleep_until(generators.window[0])
    server_cpu = process_cpu_s(server.process.pid)
    sleep_until(generators.window[1])
    server_cpu = process_cpu_s(server.process.pid) - server_cpu
    records, summary = generators.wait()
    return figures(records, summary, connections, opts.duration_s, server_cpu, other.cores())


def figures(records: dict[str, np.ndarray], summary: dict, connections: int, duration_s: float, server_cpu_s: float,
            other_cores: float) -> LoadFigures:
    return LoadFigures(connections=connections, duration_s=duration_s, **summarize(records, duration_s),
                       generator_cores=summary["window_cpu_s"] / duration_s, server_cores=server_cpu_s / duration_s,
                       other_cores=other_cores, connects=summary["connects"], connect_errors=summary["connect_errors"])


# --- the large wrong-shape body and the server's memory ---------------------------------------------

def wrong_shape_body(path: Path, input_name: str, target_bytes: int, limit_bytes: int) -> tuple[Path, list[int]]:
    """A valid V2 JSON body of about ``target_bytes`` (under ``limit_bytes``): FP32 values with the shape
    [1, 1, 28, k], which the CNN's [-1, 1, 28, 28] refuses. Returns the file and the shape."""
    rng = np.random.default_rng(0)

    def encode(k: int) -> tuple[bytes, list[int]]:
        shape = [1, 1, 28, k]
        data = rng.random(28 * k, dtype=np.float32)
        doc = {"inputs": [{"name": input_name, "shape": shape, "datatype": "FP32", "data": data}]}
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), shape

    sample, _ = encode(10_000)
    k = int(target_bytes / (len(sample) / 10_000))
    body, shape = encode(k)
    while len(body) > limit_bytes:
        k = int(k * 0.95)
        body, shape = encode(k)
    path.write_bytes(body)
    return path, shape


class RssSampler:
    """VmRSS of one process every ``interval_s`` in a thread: (wall time, MB) pairs."""

    def __init__(self, pid: int, interval_s: float = RSS_INTERVAL_S) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), rss_mb(self.pid)))
            self._stop.wait(self.interval_s)

    def between(self, start: float, end: float) -> list[float]:
        return [mb for at, mb in self.samples if start <= at <= end]

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS from /proc/PID/status); 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class LooperFigures:
    alone: LoadFigures
    beside: LoadFigures  # the 8 connections while the looper ran
    looper: str  # its statuses and latency
    body_bytes: int
    shape: list[int]
    rss_ready_mb: float
    rss_idle_mb: float
    rss_peak_mb: float


def looper_runs(repo: leanserve.Repository, normal: Path, folder: Path, opts: Options) -> LooperFigures:
    """On a fresh server: 8 connections alone, then beside one client looping the wrong-shape body."""
    body, shape = wrong_shape_body(folder / "wrong-shape.json", "image", LOOPER_BODY_BYTES, 64 * 2**20 - 1)
    size = body.stat().st_size
    print(f"large body: {size / 1e6:.1f} MB of V2 JSON, declared shape {shape} (the model takes [-1, 1, 28, 28])")
    with Server(repo.root, [CNN], folder / "server-looper.log") as server, RssSampler(server.process.pid) as rss:
        time.sleep(1.0)
        rss_ready = float(np.median(rss.between(time.time() - 1.0, time.time())))
        alone = load_run(server, normal, 8, opts, folder, "alone")
        print(f"  8 connections alone:  {alone.describe()}")
        time.sleep(1.5)
        idle_samples = rss.between(time.time() - 1.0, time.time())
        rss_idle = float(np.median(idle_samples))
        other = OtherLoad((server.process.pid,))
        start_at = time.time() + PROCESS_START_S
        looper_gen = Generators(server.port, body, 1, opts, folder, "looper", start_at=start_at)
        beside_gen = Generators(server.port, normal, 8, opts, folder, "beside", start_at=start_at)
        sleep_until(beside_gen.window[0])
        server_cpu = process_cpu_s(server.process.pid)
        sleep_until(beside_gen.window[1])
        server_cpu = process_cpu_s(server.process.pid) - server_cpu
        beside_records, beside_summary = beside_gen.wait()
        looper_records, looper_summary = looper_gen.wait()
        peak = max(rss.between(start_at, time.time()), default=0.0)
        other_cores = other.cores()  # while the server runs: it counts its CPU apart
    beside = figures(beside_records, beside_summary, 8, opts.duration_s, server_cpu, other_cores)
    looper = (f"{looper_line(looper_records, opts.duration_s)}; its load generator "
              f"{looper_summary['window_cpu_s'] / opts.duration_s:.2f} cores, {looper_summary['connects']} connects")
    print(f"  8 connections beside: {beside.describe()}")
    print(f"  the looper:           {looper}")
    print(f"  server RSS: {rss_ready:.0f} MB at ready, {rss_idle:.0f} MB idle after the 8-connection run, "
          f"{peak:.0f} MB peak with the looper\n")
    return LooperFigures(alone, beside, looper, size, shape, rss_ready, rss_idle, peak)


def looper_line(records: dict[str, np.ndarray], duration_s: float) -> str:
    """The looper's statuses and latency, every status (its answers are all expected to be refusals)."""
    in_window = (records["sent"] >= 0) & (records["sent"] < duration_s)
    latency = (records["done"] - records["sent"])[in_window]
    values, counts = np.unique(records["status"][in_window], return_counts=True)
    statuses = ", ".join(f"{_status_name(int(v))}: {n}" for v, n in zip(values, counts)) or "none sent"
    return (f"{statuses}; latency p50 {_percentile_ms(latency, 50):.0f} ms, max "
            f"{(latency.max() * 1000 if len(latency) else float('nan')):.0f} ms")


# --- targets ---------------------------------------------------------------------------------------

def overload_checks(capacity: LoadFigures, runs: list[LoadFigures]) -> list[Check]:
    checks = []
    for run in runs:
        share = run.accepted_per_s / capacity.accepted_per_s if capacity.accepted_per_s else 0.0
        bad = run.unexpected + run.rejected_without_retry_after
        checks += [
            Check(f"c={run.connections}: only 200/503, 503 with Retry-After",
                  f"{run.unexpected} other, {run.rejected_without_retry_after} without Retry-After", "0", bad == 0),
            Check(f"c={run.connections}: accepted throughput",
                  f"{share:.0%} of capacity ({run.accepted_per_s:.0f} vs {capacity.accepted_per_s:.0f} req/s)",
                  ">= 80% of capacity", share >= 0.8),
            Check(f"c={run.connections}: accepted p99", f"{run.accepted_p99_ms:.1f} ms", "<= 250 ms",
                  run.accepted_p99_ms <= 250),
        ]
    return checks


def looper_checks(f: LooperFigures) -> list[Check]:
    share = f.beside.accepted_per_s / f.alone.accepted_per_s if f.alone.accepted_per_s else 0.0
    growth = f.rss_peak_mb / f.rss_idle_mb if f.rss_idle_mb else float("inf")
    return [
        Check("60 MB wrong-shape looper: 8-connection throughput",
              f"{share:.0%} ({f.beside.accepted_per_s:.0f} vs {f.alone.accepted_per_s:.0f} req/s)",
              ">= 80% of without", share >= 0.8),
        Check("60 MB wrong-shape looper: server RSS", f"peak {f.rss_peak_mb:.0f} MB, {growth:.2f}x idle "
              f"({f.rss_idle_mb:.0f} MB)", "< 2x idle", growth < 2),
    ]


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="measured seconds per load run (default 10; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per load run, short warm-up")
    parser.add_argument("--connections", type=int, nargs="+", default=[256, 2500],
                        help="overloaded runs' connection counts (default: 256 2500)")
    parser.add_argument("--no-record", action="store_true", help="do not append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 10.0)
    if duration <= 0:
        parser.error("--duration must be positive")
    if min(args.connections) < 1:
        parser.error("--connections must be at least 1")
    return Options(duration_s=duration, warmup_s=1.0 if args.quick else 2.0, grace_s=5.0 if args.quick else 15.0,
                   overload_connections=tuple(args.connections), record=not args.no_record, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    """Build, serve, overload, measure, compare; returns 0 (the figures, not the exit status, tell)."""
    opts = parse_args(argv)
    from machine import print_header, record

    header = print_header("overload_bench" + (" --quick" if opts.quick else ""))
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} usable cores, shared by the server and the Python load generator (benchmarks/http_load.py); "
          f"{opts.duration_s:g} s measured per run after {opts.warmup_s:g} s warm-up\n")
    with tempfile.TemporaryDirectory(prefix="overload-bench-") as tmp:
        folder = Path(tmp)
        repo = leanserve.Repository(folder / "repo")
        workload = build_cnn(repo, folder, epochs=1)
        normal = write_bodies(folder / "bodies", workload, binary=False) / "1.body"
        print(f"capacity and overload on one server ({len(normal.read_bytes())} byte JSON body, defaults):")
        with Server(repo.root, [CNN], folder / "server.log") as server:
            capacity = load_run(server, normal, 16, opts, folder, "capacity")
            print(f"  {capacity.describe()}")
            overloaded = []
            for connections in opts.overload_connections:
                overloaded.append(load_run(server, normal, connections, opts, folder, f"c{connections}"))
                print(f"  {overloaded[-1].describe()}")
        print()
        looper = looper_runs(repo, normal, folder, opts)
    checks = overload_checks(capacity, overloaded) + looper_checks(looper)
    print_checks(checks)
    busiest = max(r.other_cores for r in (capacity, *overloaded, looper.alone, looper.beside))
    if busiest > 0.1:
        print(f"WARNING: other processes used up to {busiest:.2f} cores during the runs; rerun on a quiet machine "
              "before trusting these figures.\n")
    lines = [f"{cores} cores shared by server and Python load generator; {opts.duration_s:g} s per run",
             f"unloaded capacity (16 connections, JSON): {capacity.describe()}",
             *(f"overload {run.describe()}" for run in overloaded),
             f"8 connections alone: {looper.alone.describe()}",
             f"8 connections beside a {looper.body_bytes / 1e6:.0f} MB shape-{looper.shape} looper: {looper.beside.describe()}",
             f"the looper: {looper.looper}",
             f"server RSS: {looper.rss_ready_mb:.0f} MB at ready, {looper.rss_idle_mb:.0f} MB idle, "
             f"{looper.rss_peak_mb:.0f} MB peak with the looper",
             *(f"{c.name}: {c.figure} (target {c.target}: {'PASS' if c.passed else 'FAIL'})" for c in checks)]
    if opts.record:
        record(header, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
