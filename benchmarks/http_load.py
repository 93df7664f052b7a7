"""A closed-loop HTTP/1.1 load generator that records every response: status, latency, Retry-After.

wrk reports one latency distribution for all answers, so it cannot say how fast the *accepted* requests
were while others were shed; this records (send time, done time, status, has Retry-After) per response.
Each connection sends one prebuilt request (bytes) back to back on a kept-alive socket, reads the
answer with httptools' parser (the one uvicorn uses) and sends again; when the server closes the
connection (after a 503, say) it reconnects. A large request is written while its answer is read, so a
server that answers before reading the body (and closes) is measured when it answers.

Connections open gradually (``--ramp-per-100ms``) so the server's accept queue does not overflow.
Times are wall-clock seconds (``time.time()``) shared with the caller, so several generator processes
measure the same window: responses whose request was *sent* in [window-start, window-end) are the
sample; after window-end no new request is sent and outstanding ones get ``--grace`` seconds.

    python benchmarks/http_load.py --port 8000 --path /v2/models/digits-cnn/infer --body 1.body \
        --connections 256 --start-at T --window-start T1 --window-end T2 --out records.npz

Writes ``--out`` (npz: sent, done [s, relative to window-start], status, retry_after) and prints one
JSON line: this process's CPU seconds during the window and in all, connects, connection errors.
Status 0 marks a request that failed on the socket (reset, refused, closed mid-answer) and -1 one
still unanswered at the end of the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import httptools
import numpy as np
import uvloop

LARGE_REQUEST = 1 << 20  # bigger requests are written concurrently with reading the answer
RECONNECT_PAUSE_S = 0.05  # after a refused or failed connect, so a full accept queue is not hammered


class _Answer:
    """httptools callbacks for one response: whether Retry-After came, whether the connection stays open,
    whether the response is complete."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.retry_after = False
        self.keep_alive = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = True

    def on_headers_complete(self) -> None:
        # llhttp's keep-alive flag is only valid until the message completes (uvicorn reads it here too)
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True


def build_request(port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """One HTTP/1.1 keep-alive POST of ``body`` to ``path``."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """Read one response; returns (status, has Retry-After, connection stays open). Raises
    ConnectionError when the connection ends before the response does."""
    answer = _Answer()
    parser = answer.parser = httptools.HttpResponseParser(answer)
    while not answer.complete:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionResetError("connection closed before the response was complete")
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            raise ConnectionResetError("unexpected upgrade") from None
        except httptools.HttpParserError as exc:
            raise ConnectionResetError(f"unparseable response: {exc}") from None
    return parser.get_status_code(), answer.retry_after, answer.keep_alive


class Load:
    """Connections that each loop one request; ``records`` collects (sent, done, status, retry_after)."""

    def __init__(self, port: int, request: bytes, window: tuple[float, float], grace_s: float) -> None:
        self.port = port
        self.request = request
        # wall-clock window -> perf_counter, which is what latencies are measured with
        offset = time.time() - time.perf_counter()
        self.window_start, self.window_end = window[0] - offset, window[1] - offset
        self.give_up = self.window_end + grace_s
        self.records: list[tuple[float, float, int, bool]] = []
        self.pending: dict[int, float] = {}  # connection -> when its unanswered request was sent
        self.connects = 0
        self.connect_errors = 0

    async def connection(self, index: int) -> None:
        """One client: connect, send, read, repeat until the window ends; reconnect when closed."""
        reader = writer = None
        while time.perf_counter() < self.window_end:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    self.connects += 1
                except OSError:
                    self.connect_errors += 1
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
            self.pending[index] = sent = time.perf_counter()
            keep, unsent = await self._one(reader, writer, sent)
            del self.pending[index]
            if not keep:
                if unsent:  # answered before the body was all sent: drop the rest rather than flush it
                    writer.transport.abort()
                else:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: float) -> tuple[bool, bool]:
        """Send the request and read its answer, and record it; returns (connection reusable, part of the
        request left unsent)."""
        sending = None
        try:
            writer.write(self.request)
            if len(self.request) > LARGE_REQUEST:
                sending = asyncio.ensure_future(writer.drain())
            status, retry_after, keep = await read_answer(reader)
        except OSError:
            self.records.append((sent, time.perf_counter(), 0, False))
            if sending is not None:
                sending.cancel()
            return False, sending is not None
        self.records.append((sent, time.perf_counter(), status, retry_after))
        if sending is None:
            return keep, False
        if not sending.done():
            # answered before the body was all sent: the server closes, or would have to read the rest
            sending.cancel()
            return False, True
        return keep and sending.exception() is None, False

    async def run(self, connections: int, start_at: float, per_100ms: int) -> None:
        """Open ``connections`` clients, ``per_100ms`` at a time from ``start_at`` (wall clock); after the
        grace period, requests still unanswered are recorded with status -1."""
        await asyncio.sleep(max(0.0, start_at - time.time()))
        tasks = []
        for first in range(0, connections, per_100ms):
            tasks += [asyncio.ensure_future(self.connection(first + i))
                      for i in range(min(per_100ms, connections - first))]
            await asyncio.sleep(0.1)
        _, late = await asyncio.wait(tasks, timeout=max(0.0, self.give_up - time.perf_counter()))
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        self.records += [(sent, self.give_up, -1, False) for sent in self.pending.values()]


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(args: argparse.Namespace) -> dict:
    """Run the load; returns the summary and leaves the records on ``load``."""
    body = Path(args.body).read_bytes()
    load = Load(args.port, build_request(args.port, args.path, body, args.content_type),
                (args.window_start, args.window_end), args.grace)
    cpu_at_window = {}

    async def mark_window() -> None:
        await asyncio.sleep(max(0.0, args.window_start - time.time()))
        cpu_at_window["start"] = cpu_s()
        await asyncio.sleep(max(0.0, args.window_end - time.time()))
        cpu_at_window["end"] = cpu_s()

    marker = asyncio.ensure_future(mark_window())
    await load.run(args.connections, args.start_at, args.ramp_per_100ms)
    await marker
    records = np.array(load.records, dtype=[("sent", "f8"), ("done", "f8"), ("status", "i2"), ("retry_after", "?")])
    np.savez(args.out, sent=records["sent"] - load.window_start, done=records["done"] - load.window_start,
             status=records["status"], retry_after=records["retry_after"])
    return {"window_cpu_s": cpu_at_window["end"] - cpu_at_window["start"], "total_cpu_s": cpu_s(),
            "connects": load.connects, "connect_errors": load.connect_errors, "responses": len(records)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="URL path to POST to")
    parser.add_argument("--body", required=True, help="file holding the request body")
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--ramp-per-100ms", type=int, default=500, help="connections opened per 100 ms")
    parser.add_argument("--start-at", type=float, required=True, help="wall-clock time to open the first connection")
    parser.add_argument("--window-start", type=float, required=True, help="wall-clock start of the measured window")
    parser.add_argument("--window-end", type=float, required=True, help="wall-clock end: no request is sent after it")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds outstanding requests get after the window")
    parser.add_argument("--out", required=True, help="npz file for the records")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.ramp_per_100ms < 1:
        parser.error("--connections and --ramp-per-100ms must be at least 1")
    if not args.start_at <= args.window_start < args.window_end:
        parser.error("expected --start-at <= --window-start < --window-end")
    limit = raise_fd_limit()
    if limit < args.connections + 64:
        sys.exit(f"--connections {args.connections} needs more open files than this process may have ({limit})")
    summary = uvloop.run(measure(args))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
