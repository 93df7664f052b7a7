"""The prediction log's writer process: reads batches of packed samples from stdin, inserts them into
SQLite, and reports progress on stdout as JSON lines.

It is a separate process, not a thread of the server, because SQLite inserts from a thread take and
release the GIL many times per row, and every time contend with the event loop: measured on the digits
CNN at 100% sampling, a writer thread cost 15% of the server's throughput. Here the server's part is
packing rows and one pipe write per batch.

This file is run as a script (``python writer.py DB MAX_ROWS``) and imports only the standard library
and orjson, so the process starts in milliseconds and does not load leanserve, numpy or any engine.
Frames on stdin: 8-byte little-endian length, then a 4-byte metadata length, the metadata (JSON list
of ``[ts, model, version, request_id, latency_ms, group, inputs_len, outputs_len]``), and the inputs and
outputs blobs of each row in order. End of input (the server closed the pipe or died) ends the process.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys

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
    inputs BLOB NOT NULL,
    outputs BLOB NOT NULL,
    label BLOB,
    label_ts REAL
);
CREATE INDEX IF NOT EXISTS by_request ON predictions (model, request_id);
CREATE INDEX IF NOT EXISTS by_version ON predictions (model, version, id);
-- labelled rows only (feedback fills label later): the quality and bias rounds read just these, and
-- without it each round scanned every logged row (hundreds of MB at the default retention)
CREATE INDEX IF NOT EXISTS labelled ON predictions (model, id) WHERE label IS NOT NULL;
"""
CHUNK_ROWS = 64  # rows per INSERT statement (8 values each: well under SQLite's variable limit)
_COLUMNS = "(ts, model, version, request_id, latency_ms, grp, inputs, outputs)"


def connect(path: str) -> sqlite3.Connection:
    """A connection with the log's settings (WAL, so readers in the server never block the writer)."""
    db = sqlite3.connect(path, timeout=1.0, check_same_thread=False)
    db.execute("PRAGMA page_size=16384")  # rows carry kilobytes of tensors: big pages insert ~30% faster
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def insert_sql(rows: int) -> str:
    return f"INSERT INTO predictions {_COLUMNS} VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)


def encode_frame(rows: list[tuple]) -> bytes:
    """rows of (ts, model, version, request_id, latency_ms, group, inputs_blob, outputs_blob) -> one frame."""
    meta = orjson.dumps([[ts, m, v, rid, lat, grp, len(i), len(o)] for ts, m, v, rid, lat, grp, i, o in rows])
    blobs = b"".join(blob for row in rows for blob in row[6:8])
    body = len(meta).to_bytes(4, "little") + meta + blobs
    return len(body).to_bytes(8, "little") + body


def decode_frame(body: bytes) -> list[tuple]:
    size = int.from_bytes(body[:4], "little")
    offset, rows = 4 + size, []
    view = memoryview(body)
    for ts, m, v, rid, lat, grp, in_len, out_len in orjson.loads(body[4:4 + size]):
        inputs = view[offset:offset + in_len]
        outputs = view[offset + in_len:offset + in_len + out_len]
        rows.append((ts, m, v, rid, lat, grp, inputs, outputs))
        offset += in_len + out_len
    return rows


def write_rows(db: sqlite3.Connection, rows: list[tuple]) -> None:
    """Insert rows in one transaction, one multi-row statement per chunk."""
    with db:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS]
            db.execute(insert_sql(len(chunk)), [value for row in chunk for value in row])


def trim(db: sqlite3.Connection, max_rows: int) -> None:
    with db:
        db.execute("DELETE FROM predictions WHERE id <= (SELECT MAX(id) FROM predictions) - ?", (max_rows,))


def main(path: str, max_rows: int) -> None:
    # Background work: when the machine is saturated, the server's threads go first. The writer needs a
    # few percent of one core at thousands of samples per second; queued frames wait in the pipe.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    source, report = sys.stdin.buffer, sys.stdout
    db = connect(path)
    acked = written = failed = since_trim = 0
    error = None
    while True:
        head = source.read(8)
        if len(head) < 8:
            break
        body = source.read(int.from_bytes(head, "little"))
        rows = decode_frame(body)
        try:
            write_rows(db, rows)
            written += len(rows)
            since_trim += len(rows)
            if since_trim >= max_rows // 10 + 1:
                trim(db, max_rows)
                since_trim = 0
        except sqlite3.Error as exc:  # disk full, locked, corrupt: lose these samples, keep going
            failed += len(rows)
            error = str(exc)
        acked += len(rows)
        report.write(orjson.dumps({"acked": acked, "written": written, "failed": failed, "error": error}).decode() + "\n")
        report.flush()
    db.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
