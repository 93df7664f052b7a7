"""Structured access log: one JSON line per request, with its request id.

Written straight to a stream with orjson rather than through ``logging`` because it runs once per
request on the hot path, where the logging module's record machinery costs more than the line.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import orjson


class AccessLog:
    """Writes JSON lines to ``stream`` (stderr by default); disabled when ``enabled`` is False."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr

    def write(self, **fields: Any) -> None:
        if not self.enabled:
            return
        fields["ts"] = round(time.time(), 6)
        self._stream.write(orjson.dumps(fields).decode() + "\n")
