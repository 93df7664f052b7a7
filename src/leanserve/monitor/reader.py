"""Reading the prediction log back: rows of a model for the monitor's readers, the version that answered
a request, and delayed labels (feedback) joined to their rows by request id.

``LogReader`` is the reading half of ``store.PredictionLog``; it runs in worker threads, never on the
event loop, and opens the segments ``writer.py`` writes with SQLite's own locking.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import Overloaded
from leanserve.monitor import writer
from leanserve.monitor.packing import pack, unpack


@dataclass(frozen=True)
class Joined:
    """One accepted label beside what was predicted for it: the version and the output quality is judged
    on (``quality.judged_output``: a text classifier's probabilities, not its label names)."""

    version: int
    output: np.ndarray
    label: Any


@dataclass(frozen=True)
class FeedbackResult:
    """Labels accepted (with the predictions they were joined to), and the request ids refused
    (unknown, or already labelled)."""

    joined: list[Joined] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.joined)



JOIN_WAIT_S = 10.0  # how long a feedback write waits for the log's write lock


class LogReader:
    """Reading and feedback for ``PredictionLog`` (called from worker threads, not the event loop). The
    log supplies ``config``, ``stats``, ``read_only`` and ``_join_lock``, and ``_unwritten`` and
    ``written_through`` to wait for samples still on their way to the writer."""

    config: Any
    stats: Any
    read_only: bool
    _join_lock: threading.Lock

    def _segments(self, writable: bool = False):
        """Connections to the log's segments, newest first. A segment that retention deletes meanwhile
        is skipped (opened without create, it cannot come back as an empty file)."""
        mode = "rw" if writable else "ro"
        for _, path in reversed(writer.segments(self.config.path)):
            try:
                # the writer process runs at low priority: on a saturated machine it can hold the write
                # lock for a while between two of its time slices
                db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=JOIN_WAIT_S)
            except sqlite3.OperationalError:
                continue
            with contextlib.closing(db):
                yield path, db

    def feedback(self, model: str, labels: Iterable[tuple[str, Any]], wait_s: float = 5.0) -> FeedbackResult:
        """Attach true labels to logged requests by request id; unknown and already-labelled ids are refused.

        A label for a request answered before this call is joined whatever the log's flush state: ids
        not found on disk while samples are still on their way to the writer are looked up again once
        the samples recorded before the call are written (at most ``wait_s``). The cost is one indexed
        lookup and one read of the prediction per label; no other row is read."""
        wanted: dict[str, Any] = {}
        duplicate: list[str] = []
        for request_id, label in labels:
            if request_id in wanted:
                duplicate.append(request_id)  # twice in one call: the first label counts
            else:
                wanted[request_id] = label
        joined: list[Joined] = []
        try:
            self._locked_join(model, wanted, joined, duplicate)
            if wanted and not self.read_only and self._unwritten():
                self.stats.waits_for_writer += 1
                caught_up = self.written_through(wait_s)
                self._locked_join(model, wanted, joined, duplicate)
                if wanted and not joined and not caught_up:
                    # not "unknown": the samples may still be on their way (a starved writer process)
                    raise Overloaded(f"the prediction log's writer is more than {wait_s:g} s behind; send the "
                                     "feedback again", retry_after_s=1.0)
        except sqlite3.OperationalError as exc:
            # Each segment's labels commit together; a segment that stayed locked took none of its labels,
            # so the client can send the whole call again (labels already taken come back as duplicates).
            raise Overloaded(f"the prediction log is busy ({exc}); send the feedback again", retry_after_s=1.0) from exc
        return FeedbackResult(joined, list(wanted), duplicate)

    def versions_of(self, model: str, request_ids: Iterable[str], wait_s: float = 5.0) -> dict[str, int]:
        """The version that answered each request id found in the log (its newest row), waiting for samples
        still on their way to the writer as ``feedback`` does; ids not found are left out. One indexed
        lookup per id."""
        wanted = set(request_ids)
        found: dict[str, int] = {}
        self._find_versions(model, wanted, found)
        if wanted and not self.read_only and self._unwritten():
            self.written_through(wait_s)
            self._find_versions(model, wanted, found)
        return found

    def _find_versions(self, model: str, wanted: set[str], found: dict[str, int]) -> None:
        for _, db in self._segments():
            if not wanted:
                break
            for request_id in list(wanted):
                row = db.execute("SELECT version FROM predictions WHERE model = ? AND request_id = ? "
                                 "ORDER BY id DESC LIMIT 1", (model, request_id)).fetchone()
                if row is not None:
                    found[request_id] = int(row[0])
                    wanted.discard(request_id)

    def _locked_join(self, model: str, wanted: dict[str, Any], joined: list[Joined], duplicate: list[str]) -> None:
        with self._join_lock:
            self._join(model, wanted, joined, duplicate)

    def _join(self, model: str, wanted: dict[str, Any], joined: list[Joined], duplicate: list[str]) -> None:
        """Label the rows of the ids in ``wanted`` (newest segment first), taking each id found out of it."""
        now = time.time()
        for path, db in self._segments(writable=True):
            if not wanted:
                break
            with db:
                for request_id in list(wanted):
                    row = db.execute("SELECT id, label IS NOT NULL, version, offset, inputs_len, outputs_len FROM predictions "
                                     "WHERE model = ? AND request_id = ? ORDER BY id DESC LIMIT 1", (model, request_id)).fetchone()
                    if row is None:
                        continue
                    if row[1]:
                        del wanted[request_id]
                        duplicate.append(request_id)
                        continue
                    output = self._judged_output(path, row[3] + row[4], row[5])
                    if output is None:
                        continue  # its segment was deleted by retention meanwhile: the id stays unknown
                    label = wanted.pop(request_id)
                    db.execute("UPDATE predictions SET label = ?, label_ts = ? WHERE id = ?",
                               (pack({"label": np.asarray(label)}), now, row[0]))
                    joined.append(Joined(row[2], output, label))

    @staticmethod
    def _judged_output(db_path: Path, offset: int, length: int) -> np.ndarray | None:
        from leanserve.monitor.quality import judged_output

        try:
            with open(writer.blob_path(db_path), "rb") as tensors:
                outputs = unpack(os.pread(tensors.fileno(), length, offset))
        except FileNotFoundError:
            return None
        return judged_output(outputs)

    def rows(self, model: str, version: int | None = None, limit: int = 1000, labelled: bool = False) -> list[dict[str, Any]]:
        """The newest ``limit`` samples of a model (one version, or all), oldest first."""
        where, args = ["model = ?"], [model]
        if version is not None:
            where.append("version = ?")
            args.append(version)
        if labelled:
            where.append("label IS NOT NULL")
        found: list[dict[str, Any]] = []
        for path, db in self._segments():
            if len(found) >= limit:
                break
            rows = db.execute(
                f"SELECT ts, version, request_id, latency_ms, grp, offset, inputs_len, outputs_len, label FROM predictions "
                f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*args, limit - len(found))).fetchall()
            if not rows:
                continue
            try:
                tensors = open(writer.blob_path(path), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                continue  # deleted by retention since the query
            with tensors:
                for ts, v, rid, lat, grp, offset, in_len, out_len, lbl in rows:
                    data = os.pread(tensors.fileno(), in_len + out_len, offset)
                    found.append({"ts": ts, "version": v, "request_id": rid, "latency_ms": lat, "group": grp,
                                  "inputs": unpack(data[:in_len]), "outputs": unpack(data[in_len:]),
                                  "label": unpack(lbl)["label"] if lbl else None})
        self.stats.rows_read += len(found)
        return found[::-1]

    def count(self, model: str | None = None) -> int:
        total = 0
        for _, db in self._segments():
            if model is None:
                total += db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            else:
                total += db.execute("SELECT COUNT(*) FROM predictions WHERE model = ?", (model,)).fetchone()[0]
        return total
