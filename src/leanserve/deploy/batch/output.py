"""A job's output: one Parquet part per chunk (an ``id`` column and one column per model output), each
written under a temporary name and renamed, so a part on disk is always whole."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.deploy.batch.chunk import Chunk, ChunkRecord
from leanserve.deploy.batch.manifest import read_manifest


def part_name(index: int) -> str:
    """The part file of chunk ``index``: its name is its number, so a redo overwrites, never duplicates."""
    return f"part-{index:05d}.parquet"


def write_part(output: Path, chunk: Chunk, outputs: Mapping[str, np.ndarray] | None, signature: Signature,
               began: float) -> ChunkRecord:
    """Write the chunk's part atomically (none when every row was rejected); returns its record, ``began``
    being when the executor started the chunk."""
    part = None
    if outputs is not None:
        part = part_name(chunk.index)
        _write_table(output / part, chunk.ids, outputs, signature)
    return ChunkRecord(chunk.index, part, len(chunk.ids), len(chunk.rejects), chunk.rejects, began, time.time())


def _write_table(path: Path, ids, outputs: Mapping[str, np.ndarray], signature: Signature) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)}
    for spec in signature.outputs:
        values = outputs[spec.name]
        flat = values.reshape(len(values), -1) if values.ndim > 1 else values
        if flat.ndim == 1:
            columns[spec.name] = pa.array(flat)
        else:
            columns[spec.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


class PartWriter:
    """Writes parts on one thread, in order, while the engine runs the next chunk. At most one part waits,
    so memory stays at about three chunks whatever the input's size. An error on the thread (a full disk,
    a vanished folder) is raised on the caller's thread at the next ``put`` or ``close``."""

    def __init__(self, output: Path, signature: Signature) -> None:
        self.output, self.signature = output, signature
        self._todo: queue.Queue = queue.Queue(maxsize=1)
        self._written: queue.Queue = queue.Queue()  # unbounded: one small record per chunk
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batch-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: Chunk, outputs: Mapping[str, np.ndarray] | None, began: float) -> None:
        """Queue the chunk's part; blocks while another part waits."""
        self._raise()
        self._todo.put((chunk, outputs, began))

    def written(self) -> Iterator[ChunkRecord]:
        """The records of parts written since the last call, without waiting."""
        while True:
            try:
                yield self._written.get_nowait()
            except queue.Empty:
                self._raise()
                return

    def close(self) -> None:
        """Wait for the queued parts (their records stay readable through ``written``)."""
        if not self._closed:
            self._closed = True
            self._todo.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (item := self._todo.get()) is not None:
            if self._error is not None:
                continue  # drain: the job stops at the next put
            try:
                self._written.put(write_part(self.output, *item[:2], self.signature, item[2]))
            except BaseException as exc:  # raised on the job's thread
                self._error = exc


def read_output(output: str | Path):
    """The finished job's rows as one pyarrow Table (id and outputs), in chunk order.

    Raises InvalidInput when ``output`` holds no job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    chunks = read_manifest(output)["chunks"]
    parts = [pq.read_table(output / chunks[k]["part"]) for k in sorted(chunks, key=int) if chunks[k]["part"]]
    return pa.concat_tables(parts) if parts else pa.table({})
