"""The monitor's slow round (quality, bias and fairness from delayed labels; drift against reference
profiles), computed in a worker process at the lowest CPU priority.

Everything it needs is on disk (the prediction log's segments, the versions' reference profiles), so
the serving process spends neither CPU nor the GIL on it: a drift test of 500 logged images against
their profile takes about 0.3 s of CPU, every ten seconds per version, which on a 2-core server used to
come straight out of request handling.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DRIFT_ROWS = 500  # newest logged rows of a version compared with its profile
LABELLED_ROWS = 5000  # newest labelled rows behind quality, bias and fairness


@dataclass(frozen=True)
class LabelsReport:
    """Quality (per version), bias reports and fairness reports of one model from its labelled rows."""

    quality: dict[int, Any]
    bias: list[Any]
    fairness: dict[int, Any]


def labels_round(log_path: Path, name: str) -> LabelsReport:
    """Quality, bias and (with leanserve[fairness]) fairness of model ``name`` from the log at ``log_path``."""
    from leanserve.fairness import metrics as fairness
    from leanserve.monitor.bias import bias_by_group
    from leanserve.monitor.quality import rolling_quality

    rows = _read_rows(log_path, name, None, LABELLED_ROWS, labelled=True)
    return LabelsReport({q.version: q for q in rolling_quality(rows)}, bias_by_group(rows),
                        fairness.fairness_by_version(rows) if fairness.available() else {})


def drift_round(repo_root: Path, log_path: Path, name: str, version: int) -> dict[str, Any] | None:
    """Drift of a version's newest logged traffic from its reference profile; None without a profile."""
    from leanserve.monitor.drift import DriftConfig, detect
    from leanserve.monitor.reference import load_reference, profile_path
    from leanserve.monitor.watched import watched_rows
    from leanserve.repository import Repository

    repo = Repository(repo_root, create=False)
    if not profile_path(repo, name, version).is_file():
        return None
    profile = load_reference(repo, name, version)
    if profile is None:
        return None
    rows = _read_rows(log_path, name, version, DRIFT_ROWS)
    signature = repo.get(name, version, verify=False).signature
    # what drift watches of each logged request (a text model's outputs, not its text; token lengths, not
    # padded ids), stacked; tensors the profile does not hold are not tested
    live = watched_rows(signature, [{**r["inputs"], **r["outputs"]} for r in rows])
    report = detect(profile, {n: a for n, a in live.items() if n in profile.names}, DriftConfig())
    drifted = [f"{d.tensor}[{d.feature}] {d.method}" for d in report.features if d.drifted]
    return {"drifted": bool(report.drifted), "features": drifted, "rows": len(rows)}


def _read_rows(log_path: Path, name: str, version: int | None, limit: int, labelled: bool = False) -> list:
    from leanserve.monitor.store import LogConfig, PredictionLog, log_exists

    if not log_exists(log_path):
        return []
    reader = PredictionLog(LogConfig(log_path), read_only=True)
    try:
        return reader.rows(name, version, limit=limit, labelled=labelled)
    finally:
        reader.close()


def _lowest_priority(parent: int) -> None:
    from threadpoolctl import threadpool_limits

    os.nice(19)
    # A worker outlives a server that was killed (or that exited while a round ran): it ends itself
    # within a second of its parent.
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    # One BLAS thread: the drift test's matrix products would otherwise take every core (OpenBLAS threads
    # also spin while they wait), which is exactly what this process is here to avoid.
    threadpool_limits(1)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _load_modules() -> None:
    """Import what the rounds use (NumPy, SciPy, fairlearn: seconds of CPU once per process)."""
    from leanserve.fairness import metrics as fairness
    from leanserve.monitor import bias, drift, quality, reference, store  # noqa: F401

    if fairness.available():
        import fairlearn.metrics  # noqa: F401


class RoundWorker:
    """One worker process (started at the first round, spawned rather than forked from the threaded
    server) that runs the round functions above."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def warm_up(self) -> None:
        """Start the process and have it import its libraries now, without waiting for them: at the lowest
        priority, in a process of its own, the seconds of imports never hold the server's GIL and yield
        the CPU to requests, and the first round then finds them done."""
        self._start().submit(_load_modules)

    async def run(self, function, *args):
        """``function(*args)`` in the worker process; its exceptions are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._start(), function, *args)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_lowest_priority, initargs=(os.getpid(),))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
