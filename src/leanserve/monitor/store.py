"""The prediction log: a sample of requests (inputs, outputs, version, latency, request id, group) in a
folder of segments (SQLite in WAL mode for the rows, an append-only file for their tensors: see
``writer.py``), written off the request path, with bounded retention.

Serving never waits for it: ``record`` packs the sample on the caller's thread (microseconds) and
hands frames of samples to a writer process with non-blocking pipe writes (``writer.py``); when the
writer falls ``queue_size`` samples behind, new samples are dropped and counted. A full disk, a locked database or a dead writer costs
samples, never requests. Reading the log back and joining delayed labels (feedback) to its rows by
request id is ``reader.py``; the tensor format is ``packing.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from leanserve.errors import InvalidInput
from leanserve.monitor import writer
from leanserve.monitor.packing import pack_into
from leanserve.monitor.reader import LogReader

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


def log_exists(path: Path) -> bool:
    """Whether ``path`` holds a prediction log (a folder of segments, as ``PredictionLog`` writes)."""
    return Path(path).is_dir() and bool(writer.segments(Path(path)))


class PredictionLog(LogReader):
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
