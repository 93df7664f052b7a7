"""Offline batch jobs (issue 8): rows/s of ``leanserve predict`` on a 1M-row Parquet table against the
same engine called in a plain loop over the same rows, side by side. Goal: the job at least 95% of
the engine.

    python benchmarks/batch_bench.py [--rows 1000000] [--batch-size 1024] [--chunk-rows 65536]

The model is a 64-512-512-10 MLP on scikit-learn's digits (64 features): a small tabular model, fast
enough that the job's own costs (reading, checking, writing Parquet) show.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def make_mlp_job(work: Path, n_rows: int, chunk_rows: int):
    """The benchmark's model and table in ``work``: (repository with "mlp", the rows as an array, a session);
    the table is ``work/rows.parquet`` (an id column and 64 feature columns, row groups of ``chunk_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sklearn.datasets import load_digits

    import leanserve
    from leanserve.runtime import load_session

    x, _ = load_digits(return_X_y=True)
    rows = x[np.random.default_rng(0).integers(0, len(x), n_rows)].astype(np.float32)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                              torch.nn.Linear(512, 10)).eval()
    leanserve.export(mlp, torch.zeros(2, 64), work / "mlp.onnx", input_names=["x"], output_names=["logits"])
    repo = leanserve.Repository(work / "repo")
    repo.add(work / "mlp.onnx", "mlp")
    pq.write_table(pa.table({"id": np.arange(n_rows), **{f"f{i}": rows[:, i] for i in range(64)}}),
                   work / "rows.parquet", row_group_size=chunk_rows)
    return repo, rows, load_session(repo.get("mlp"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=65536)
    args = parser.parse_args()
    from leanserve.deploy.batch import run_job

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo, rows, session = make_mlp_job(work, args.rows, args.chunk_rows)

        def engine_loop() -> float:
            started = time.perf_counter()
            for start in range(0, args.rows, args.batch_size):
                session.run({"x": rows[start:start + args.batch_size]})
            return args.rows / (time.perf_counter() - started)

        # engine, job, engine, job: each side's best round, so one noisy round cannot decide the ratio
        engines, jobs = [], []
        for round_ in range(2):
            engines.append(engine_loop())
            summary = run_job(session, "mlp", 1, work / "rows.parquet", work / f"out{round_}", chunk_rows=args.chunk_rows,
                              batch_size=args.batch_size, progress=False)
            assert summary.written == args.rows
            jobs.append(summary.rows_per_s)
        engine, job = max(engines), max(jobs)
    ratio = job / engine
    print(f"\n{args.rows:,} rows, batch {args.batch_size}, chunks of {args.chunk_rows:,}:")
    print(f"  engine in a plain loop (arrays in memory)   {engine:>12,.0f} rows/s")
    print(f"  leanserve predict job (Parquet in and out)   {job:>12,.0f} rows/s   {ratio:.1%} of the engine")
    print(f"\nlocal job vs engine: {ratio:.1%}   target >= 95%   {'PASS' if ratio >= 0.95 else 'FAIL'}")


if __name__ == "__main__":
    from machine import run_recorded  # benchmarks/ (the script's folder) is on sys.path

    run_recorded("batch_bench", main)
