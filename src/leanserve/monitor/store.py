"""The prediction log: a sample of requests (inputs, outputs, version, latency, request id, group) in a
folder of segments (SQLite in WAL mode for the rows, an append-only file for their tensors: see
``writer.py``), written off the request path, with bounded retention.

Serving never waits for it: ``record`` packs the sample on the caller's thread (microseconds) and
hands frames of samples to a writer process with non-blocking pipe writes (``writer.py``); when the
writer falls ``queue_size`` samples behind, new samples are dropped and counted. A full disk, a locked database or a dead writer costs
samples, never requests. Delayed labels (feedback) are joined to the rows by request id.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from leanserve.errors import InvalidInput, Overloaded
from leanserve.monitor import writer

log = logging.getLogger(__name__)

_FRAME_ROWS = 64  # samples per hand-off to the writer: one pipe write each


@dataclass(frozen=True)
class LogConfig:
    """Where and how much to log. ``sample_rate`` is the share of requests kept (0..1)."""

    path: Path
    sample_rate: float = 1.0
    max_rows: int = 200_000
    queue_size: int = 10_000
    flush_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise InvalidInput(f"monitor sample_rate must be between 0 and 1, got {self.sample_rate}")
        if self.max_rows < 1 or self.queue_size < 1:
            raise InvalidInput("monitor max_rows and queue_size must be >= 1")


@dataclass
class LogStats:
    """What happened to the samples: written, dropped because the queue was full, lost to database errors."""

    written: int = 0
    dropped: int = 0
    failed: int = 0
    last_error: str | None = None
    rows_read: int = 0  # rows read back by ``rows`` (the monitor's readers; feedback reads none)
    waits_for_writer: int = 0  # feedback calls that waited for samples still on their way to the writer


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


def pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as bytes: a JSON header (name, dtype, shape, length) then the raw data.

    Not np.savez: its zip container costs ten times more, and this runs for every logged request.
    BYTES (object) arrays are stored as fixed-width byte strings; nothing is pickled.
    """
    out = bytearray()
    pack_into(out, arrays)
    return bytes(out)


def pack_into(out: bytearray, arrays: Mapping[str, np.ndarray]) -> int:
    """Append ``pack(arrays)`` to ``out`` (one copy of each array's data); returns the bytes appended."""
    # Runs for every logged request: kept to the bare minimum (~1 us for a one-tensor request).
    start = len(out)
    data = [array if array.flags.c_contiguous and not array.dtype.hasobject else _contiguous(array)
            for array in arrays.values()]
    out += _header(tuple(zip(arrays, [a.dtype for a in data], [a.shape for a in data])))
    for array in data:
        out += memoryview(array)  # the raw buffer, C order (not ``+= array``: numpy would broadcast an add)
    return len(out) - start


def _contiguous(array: np.ndarray) -> np.ndarray:
    if not array.dtype.hasobject:
        return np.ascontiguousarray(array)
    # BYTES tensors hold bytes (requests) or str (label names a pipeline answers): str as UTF-8, because
    # numpy's astype(bytes) is ASCII-only and a label like "négatif" would fail the request's logging
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
    return np.array(items, dtype=bytes).reshape(array.shape) if items else array.astype(bytes)


@functools.lru_cache(maxsize=256)
def _header(layout: tuple) -> bytes:
    # Requests of one model share a handful of layouts: encode each header once. Keyed on the dtype
    # objects themselves (``dtype.str`` builds a new string on every call).
    head = orjson.dumps([[name, dtype.str, list(shape), dtype.itemsize * math.prod(shape)] for name, dtype, shape in layout])
    return len(head).to_bytes(4, "little") + head


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays ``pack`` stored."""
    size = int.from_bytes(blob[:4], "little")
    offset, arrays = 4 + size, {}
    for name, dtype, shape, length in orjson.loads(blob[4:4 + size]):
        arrays[name] = np.frombuffer(blob, dtype=np.dtype(dtype), count=length // max(np.dtype(dtype).itemsize, 1),
                                     offset=offset).reshape(tuple(shape))
        offset += length
    return arrays


def log_exists(path: Path) -> bool:
    """Whether ``path`` holds a prediction log (a folder of segments, as ``PredictionLog`` writes)."""
    return Path(path).is_dir() and bool(writer.segments(Path(path)))


JOIN_WAIT_S = 10.0  # how long a feedback write waits for the log's write lock


class PredictionLog:
    """Samples of live traffic in SQLite, written by a child process (``writer.py``: see there why a
    process). The caller's thread packs each sample and, every ``_FRAME_ROWS`` samples, hands a frame to
    the writer with one non-blocking pipe write; no thread of the server takes the GIL for the log."""

    def __init__(self, config: LogConfig, *, read_only: bool = False) -> None:
        """``read_only``: a reader beside the server that writes the log (the learner, mitigation): no
        writer process, and ``record`` refuses."""
        self.config = config
        self.read_only = read_only
        self.stats = LogStats()
        if config.path.is_file():
            raise InvalidInput(f"{config.path} is a prediction log of an older leanserve (one SQLite file); the log is now "
                               f"a folder of segments: move the file away (or give another path) and start again")
        if read_only and not log_exists(config.path):
            raise InvalidInput(f"no prediction log at {config.path}")
        config.path.mkdir(parents=True, exist_ok=True)
        if not writer.segments(config.path):
            writer.create_segment(config.path, 1)
        self._lock = threading.Lock()  # record() may be called from several threads (gRPC, REST)
        # Feedback calls run in worker threads; SQLite lets one write at a time and its busy handler
        # backs off in growing sleeps, so concurrent callers queue here instead of racing for the lock.
        self._join_lock = threading.Lock()
        self._meta: list[list] = []  # samples not yet framed: their metadata...
        self._blobs = bytearray()  # ... and their packed tensors
        self._pending = bytearray()  # framed bytes the pipe has not taken yet
        self._shipped = 0  # samples framed for the current writer
        self._acked = 0  # samples the current writer has written or lost
        self._written_before = self._failed_before = 0  # totals of earlier writers (after a restart)
        self._last_restart = -1e9
        self._process: subprocess.Popen | None = None
        self._reports = threading.Condition()  # notified each time the writer acknowledges a frame
        self._stop = threading.Event()
        if read_only:
            return
        self._start_process()
        # wakes a few times a second to frame what a quiet server has not yet framed
        self._writer = threading.Thread(target=self._timer_loop, name="prediction-log", daemon=True)
        self._writer.start()

    # --- request path: never blocks -----------------------------------------------------------------

    def record(self, model: str, version: int, request_id: str, inputs: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray], latency_ms: float, group: str | None = None) -> bool:
        """Log one sample (subject to the sample rate); returns False when it was not kept (sampled out,
        or the writer is ``queue_size`` samples behind). The arrays are copied: the caller may reuse them."""
        if self.read_only:
            raise RuntimeError("this prediction log was opened read-only")
        if self.config.sample_rate < 1.0 and random.random() >= self.config.sample_rate:
            return False
        if self._shipped - self._acked + len(self._meta) >= self.config.queue_size:
            self.stats.dropped += 1
            return False
        # Packed here, straight into the frame being built, while the arrays are hot in cache (~2 us). A
        # thread that packed and shipped later cost the event loop ~10 us of GIL time per sample.
        with self._lock:
            blobs = self._blobs
            inputs_len = pack_into(blobs, inputs)
            self._meta.append([time.time(), model, version, request_id, latency_ms, group, inputs_len, pack_into(blobs, outputs)])
            if len(self._meta) >= _FRAME_ROWS:
                self._ship()
        return True

    # --- hand-off to the writer process (called with the lock held) --------------------------------

    def _ship(self) -> None:
        if self._meta:
            self._pending += writer.encode_frame(self._meta, self._blobs)
            self._shipped += len(self._meta)
            self._meta, self._blobs = [], bytearray()
        if not self._pending:
            return
        try:
            sent = os.write(self._process.stdin.fileno(), self._pending)  # non-blocking: takes what fits
        except BlockingIOError:
            return  # the pipe is full: the bytes wait here, bounded by queue_size
        except OSError as exc:  # the writer died: what it had not acknowledged is lost
            self._writer_died(exc)
            return
        del self._pending[:sent]

    def _writer_died(self, exc: OSError) -> None:
        lost = self._shipped - self._acked
        self.stats.failed += lost
        self.stats.last_error = f"writer process ended ({self._process.poll()}): {exc}"
        log.warning("prediction log: %d samples lost: %s", lost, self.stats.last_error)
        self._pending.clear()
        self._shipped = self._acked
        if time.monotonic() - self._last_restart > 1.0 and not self._stop.is_set():  # no restart storm
            self._last_restart = time.monotonic()
            self._start_process()

    def _start_process(self) -> None:
        self._written_before, self._failed_before = self.stats.written, self.stats.failed
        self._shipped = self._acked = 0
        process = subprocess.Popen([sys.executable, writer.__file__, str(self.config.path), str(self.config.max_rows)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        os.set_blocking(process.stdin.fileno(), False)
        with contextlib.suppress(OSError, AttributeError):  # Linux: a 1 MiB pipe takes ~300 image samples
            fcntl.fcntl(process.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        self._process = process
        threading.Thread(target=self._read_reports, args=(process,), name="prediction-log-reports", daemon=True).start()

    def _read_reports(self, process: subprocess.Popen) -> None:
        for line in process.stdout:  # blocks without the GIL until the writer reports
            if process is not self._process:
                return
            report = orjson.loads(line)
            with self._reports:
                self._acked = report["acked"]
                self._reports.notify_all()
            self.stats.written = self._written_before + report["written"]
            self.stats.failed = self._failed_before + report["failed"]
            if report["error"] and report["error"] != self.stats.last_error:
                self.stats.last_error = report["error"]
                log.warning("prediction log: samples lost: %s", report["error"])

    def _timer_loop(self) -> None:
        while not self._stop.wait(self.config.flush_interval_s):
            if self._meta or self._pending:
                with self._lock:
                    self._ship()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every logged sample has been written (or lost) by the writer, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._ship()
        while (self._pending or self._acked < self._shipped) and time.monotonic() < deadline:
            time.sleep(0.01)
            if self._pending:
                with self._lock:
                    self._ship()

    def close(self) -> None:
        """Hand over what is logged, let the writer finish, and stop it."""
        if self.read_only:
            return
        self._stop.set()
        self._writer.join(timeout=10)
        self.flush()
        process = self._process
        with contextlib.suppress(OSError):
            process.stdin.close()  # end of input: the writer finishes its frame and exits
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # --- reading and feedback (called from worker threads, not the event loop) ---------------------

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
                self.written_through(wait_s)
                self._locked_join(model, wanted, joined, duplicate)
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

    def _unwritten(self) -> bool:
        """Whether samples recorded so far are not all written yet (framed, in the pipe, or being written)."""
        return bool(self._meta or self._pending or self._acked < self._shipped)

    def written_through(self, timeout_s: float = 5.0) -> bool:
        """Wait until the samples recorded before this call are written (or lost), not for those recorded
        meanwhile (under steady traffic there always are some); returns False on timeout."""
        with self._lock:
            self._ship()
            target, process = self._shipped, self._process
        with self._reports:
            # the frames that did not fit in the pipe are shipped by the timer loop
            return self._reports.wait_for(lambda: self._acked >= target or self._process is not process, timeout_s)

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


def stack(rows: Sequence[dict[str, Any]], key: str) -> dict[str, np.ndarray]:
    """Concatenate the ``inputs`` or ``outputs`` of logged rows into arrays with a batch axis."""
    if not rows:
        return {}
    return {name: np.concatenate([r[key][name] for r in rows]) for name in rows[0][key]}
