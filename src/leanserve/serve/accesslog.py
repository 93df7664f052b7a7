"""Structured access log: one JSON line per request, with its request id.

Written straight to a stream with orjson rather than through ``logging`` because it runs once per
request on the hot path, where the logging module's record machinery costs more than the line. Lines
are buffered and written together (at most ``flush_interval_s`` late, or when ``max_buffer_bytes`` fill
up), so a busy server makes one write call per burst instead of one per request.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import IO, Any

import orjson


class AccessLog:
    """Writes JSON lines to ``stream`` (stderr by default); disabled when ``enabled`` is False."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, flush_interval_s: float = 0.2,
                 max_buffer_bytes: int = 64 * 1024) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._lines: list[str] = []
        self._size = 0
        self._flush_interval_s = flush_interval_s
        self._max_buffer_bytes = max_buffer_bytes
        self._timer: asyncio.TimerHandle | None = None

    def write(self, **fields: Any) -> None:
        if not self.enabled:
            return
        fields["ts"] = round(time.time(), 6)
        line = orjson.dumps(fields).decode() + "\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_buffer_bytes:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)
            except RuntimeError:  # no event loop (a direct call): write at once
                self.flush()

    def flush(self) -> None:
        """Write the buffered lines now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            self._stream.write("".join(lines))
            flush = getattr(self._stream, "flush", None)
            if flush is not None:
                flush()
