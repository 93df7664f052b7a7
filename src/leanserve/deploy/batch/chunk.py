"""The units a batch job moves: a chunk of rows read from the input, and the record of a chunk written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Chunk:
    """Rows read from the input: their ids and the model inputs, plus the rows set aside."""

    index: int
    ids: Any  # a pyarrow array, or a list
    inputs: dict[str, np.ndarray]
    rejects: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ChunkRecord:
    """A chunk once its part is written: what the job manifest keeps, plus when the executor ran it
    (wall clock, comparable across the processes of one machine)."""

    index: int
    part: str | None  # None when every row of the chunk was rejected
    rows: int
    rejected: int
    rejects: list[dict[str, Any]]
    began: float = 0.0
    ended: float = 0.0

    def manifest_entry(self) -> dict[str, Any]:
        """The record as ``_job.json`` stores it under the chunk's index."""
        return {"part": self.part, "rows": self.rows, "rejected": self.rejected, "rejects": self.rejects}


def jsonable(value: Any) -> Any:
    """A numpy scalar (an id read from a table) as the Python value JSON can write."""
    return value.item() if isinstance(value, np.generic) else value


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its class name when it has no message: a reject's reason."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
