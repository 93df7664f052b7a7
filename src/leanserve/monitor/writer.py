"""The prediction log's on-disk layout and its writer process.

Layout: the log is a folder of segments. A segment is ``seg-NNNNNNNN.db``, an SQLite database (WAL mode)
with one small row per sample (time, model, version, request id, latency, group, label, and where its
tensors are), beside ``seg-NNNNNNNN.bin``, the samples' packed tensors appended one frame at a time.

Why not one SQLite table with the tensors as BLOBs (the first design): every blob went through SQLite
twice (WAL, then checkpoint) and retention deleted rows one by one through every index, which in a
one-off run on the digits CNN at 100% sampling cost many times the CPU per sample of appending the
tensors to a plain file (benchmarks/monitor_bench.py measures the cost of monitoring; no figure is quoted
until it has a line in benchmarks/RESULTS.md). Retention now unlinks the oldest segment whole.

The writer is a separate process, not a thread of the server, because SQLite calls from a thread take
and release the GIL many times per row, and every time contend with the event loop. This file is run as
a script (``python writer.py FOLDER MAX_ROWS``) and imports only the standard library and orjson, so the
process starts in milliseconds and does not load leanserve, numpy or any engine. Frames on stdin: an
8-byte little-endian length, then a 4-byte metadata length, the metadata (JSON list of
``[ts, model, version, request_id, latency_ms, group, inputs_len, outputs_len]``), and the inputs and
outputs blobs of each row in order. End of input (the server closed the pipe or died) ends the process.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import sys
from pathlib import Path

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    latency_ms REAL,
    grp TEXT,
    offset INTEGER NOT NULL,   -- where the sample's packed inputs start in the segment's .bin file
    inputs_len INTEGER NOT NULL,
    outputs_len INTEGER NOT NULL,  -- the packed outputs follow the inputs
    label BLOB,
    label_ts REAL
);
CREATE INDEX IF NOT EXISTS by_request ON predictions (model, request_id);
-- labelled rows only (feedback fills label later): the quality and bias rounds read just these
CREATE INDEX IF NOT EXISTS labelled ON predictions (model, id) WHERE label IS NOT NULL;
"""
SEGMENTS = 8  # a full log spans this many segments: retention drops an eighth of it at a time
CHUNK_ROWS = 64  # rows per INSERT statement (10 values each: well under SQLite's variable limit)
_COLUMNS = "(ts, model, version, request_id, latency_ms, grp, offset, inputs_len, outputs_len)"
_SEGMENT = re.compile(r"seg-(\d{8})\.db")


def segment_rows(max_rows: int) -> int:
    return max(1, math.ceil(max_rows / SEGMENTS))


def segments(folder: Path) -> list[tuple[int, Path]]:
    """The log's segments as (number, database path), oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _SEGMENT.fullmatch(entry.name)
            if match:
                found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def segment_path(folder: Path, number: int) -> Path:
    return Path(folder) / f"seg-{number:08d}.db"


def blob_path(db_path: Path) -> Path:
    return db_path.with_suffix(".bin")


def connect(path: str | Path) -> sqlite3.Connection:
    """A writable connection with the log's settings (WAL, so readers never block the writer)."""
    db = sqlite3.connect(path, timeout=1.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def create_segment(folder: Path, number: int) -> Path:
    path = segment_path(folder, number)
    with contextlib.closing(connect(path)) as db:
        db.executescript(SCHEMA)
    blob_path(path).touch()
    return path


def insert_sql(rows: int) -> str:
    return f"INSERT INTO predictions {_COLUMNS} VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)


def encode_frame(meta: list[list], blobs: bytes | bytearray) -> bytes:
    """One frame from the rows' metadata ([ts, model, version, request_id, latency_ms, group, inputs_len,
    outputs_len] each) and their packed tensors, concatenated in the same order."""
    head = orjson.dumps(meta)
    body_len = 4 + len(head) + len(blobs)
    return b"".join((body_len.to_bytes(8, "little"), len(head).to_bytes(4, "little"), head, blobs))


def decode_frame(body: bytes) -> tuple[list[list], memoryview]:
    size = int.from_bytes(body[:4], "little")
    return orjson.loads(body[4:4 + size]), memoryview(body)[4 + size:]


class SegmentWriter:
    """Appends frames to the newest segment, starts a new one every ``segment_rows(max_rows)`` rows and
    deletes the oldest beyond ``SEGMENTS`` of them."""

    def __init__(self, folder: Path, max_rows: int) -> None:
        self.folder, self.capacity = Path(folder), segment_rows(max_rows)
        self.keep = math.ceil(max_rows / self.capacity)
        self.db: sqlite3.Connection | None = None
        self.written = 0  # rows written by this writer
        existing = segments(self.folder)
        number, path = existing[-1] if existing else (1, create_segment(self.folder, 1))
        self._open(number, path)

    def _open(self, number: int, path: Path) -> None:
        self.number, self.path = number, path
        self.db = connect(path)
        self.db.executescript(SCHEMA)
        self.rows = self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
        self.blobs = open(blob_path(path), "ab")  # noqa: SIM115 - kept open for the segment's life
        self.blobs.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self.db is not None:
            self.blobs.close()
            self.db.close()  # the last connection checkpoints the WAL away
            self.db = None

    def write(self, meta: list[list], blobs: memoryview) -> None:
        """Write a frame, splitting it where a segment fills up."""
        start = offset = 0
        while start < len(meta):
            if self.db is None or self.rows >= self.capacity:
                self._rotate()  # also retries a segment that could not be started (disk full)
            part = meta[start:start + self.capacity - self.rows]
            size = sum(row[6] + row[7] for row in part)
            self._write_part(part, blobs[offset:offset + size])
            start, offset = start + len(part), offset + size

    def _write_part(self, meta: list[list], blobs: memoryview) -> None:
        # Tensors first, then the rows that point at them: a row never points past the file's end.
        position = self.blobs.tell()
        try:
            self.blobs.write(blobs)
            self.blobs.flush()
        except OSError:
            self.blobs.seek(0, os.SEEK_END)  # a partial write leaves bytes no row points at
            raise
        values = []
        for ts, model, version, request_id, latency, group, inputs_len, outputs_len in meta:
            values.append((ts, model, version, request_id, latency, group, position, inputs_len, outputs_len))
            position += inputs_len + outputs_len
        with self.db:
            for first in range(0, len(values), CHUNK_ROWS):
                chunk = values[first:first + CHUNK_ROWS]
                self.db.execute(insert_sql(len(chunk)), [value for row in chunk for value in row])
        self.rows += len(meta)
        self.written += len(meta)

    def _rotate(self) -> None:
        self.close()
        number = self.number + 1
        self._open(number, create_segment(self.folder, number))
        for _, old in segments(self.folder)[:-self.keep]:
            for path in (old, blob_path(old), Path(f"{old}-wal"), Path(f"{old}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def main(folder: str, max_rows: int) -> None:
    # Background work: when the machine is saturated, the server's threads go first. The writer needs a
    # few percent of one core at thousands of samples per second; queued frames wait in the pipe.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    source, report = sys.stdin.buffer, sys.stdout
    segment = SegmentWriter(Path(folder), max_rows)
    acked = failed = 0
    error = None
    while True:
        head = source.read(8)
        if len(head) < 8:
            break
        meta, blobs = decode_frame(source.read(int.from_bytes(head, "little")))
        before = segment.written
        try:
            segment.write(meta, blobs)
        except (sqlite3.Error, OSError) as exc:  # disk full, locked, corrupt: lose these samples, keep going
            failed += len(meta) - (segment.written - before)
            error = str(exc)
        acked += len(meta)
        report.write(orjson.dumps({"acked": acked, "written": segment.written, "failed": failed, "error": error}).decode() + "\n")
        report.flush()
    segment.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
