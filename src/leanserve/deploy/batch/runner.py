"""Running a batch job: the job, the executor protocol both executors implement, and the loop that records
each chunk an executor finishes.

``run_job`` reads the input in chunks, runs each chunk's rows through the version's engine in batches and
writes one Parquet part per chunk; the job manifest makes it resumable after any interruption. The local
executor (here) runs chunks in this process; the Ray executor (``deploy/ray_batch.py``) runs them on a pool
of actors. Both cut the input into the same chunks, write the same parts and hand back the same records.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from leanserve.artifact import Signature
from leanserve.deploy.batch.chunk import Chunk, ChunkRecord, jsonable
from leanserve.deploy.batch.manifest import JobManifest, JobSettings, job_fingerprint
from leanserve.deploy.batch.output import PartWriter
from leanserve.deploy.batch.readers import count_rows, read_chunks
from leanserve.errors import InvalidInput


@dataclass(frozen=True)
class BatchJob:
    """One job as an executor sees it: the input, the output folder, the settings and the chunks done."""

    model: str
    version: int
    input_path: Path
    output: Path
    signature: Signature
    settings: JobSettings
    done: frozenset[int] = frozenset()

    def pending_chunks(self) -> Iterator[Chunk]:
        """The input's chunks not yet recorded in the manifest, in order."""
        s = self.settings
        for chunk in read_chunks(self.input_path, self.signature, s.chunk_rows, s.id_column, s.allow_nonfinite):
            if chunk.index not in self.done:
                yield chunk


class Executor(Protocol):
    """Runs a job's pending chunks, writes each chunk's part, and yields each chunk's record once its part
    is in place (in any order). The runner records them; an executor never touches the manifest."""

    def run(self, job: BatchJob) -> Iterator[ChunkRecord]: ...


@dataclass
class JobSummary:
    rows: int = 0
    written: int = 0
    rejected: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    processed: int = 0  # rows read and run (or rejected) by this run, not by an earlier one
    elapsed_s: float = 0.0
    first_chunk_s: float = 0.0  # from the start to the first finished chunk (a pool's start-up shows here)
    steady_rows_per_s: float = 0.0  # rows over the busy window: first chunk begun to last chunk ended

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s else 0.0


def open_job(model: str, version: int, signature: Signature, input_path: str | Path, output: str | Path,
             settings: JobSettings) -> tuple[BatchJob, JobManifest]:
    """The job and its manifest, resuming one started in ``output`` with the same arguments.

    Raises InvalidInput when the input is missing, or ``output`` is a file or holds a different job."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise InvalidInput(f"{input_path}: no such input file or folder")
    manifest = JobManifest.open(output, job_fingerprint(model, version, input_path, settings))
    job = BatchJob(model, version, input_path, output, signature, settings, frozenset(manifest.done))
    return job, manifest


def execute(job: BatchJob, manifest: JobManifest, executor: Executor, *, progress: bool = True,
            summary: JobSummary | None = None, label: str = "") -> JobSummary:
    """Run the job's pending chunks on ``executor``, recording each as it arrives, then finish the job
    (rejects file, totals). Fills and returns ``summary`` (a new JobSummary by default)."""
    from tqdm import tqdm

    summary = summary if summary is not None else JobSummary()
    done = manifest.done
    summary.chunks_skipped = len(done)
    bar = tqdm(total=count_rows(job.input_path), unit="rows", unit_scale=True,
               desc=f"{job.model}:{job.version}{label}", disable=not progress)
    bar.update(sum(c["rows"] + c["rejected"] for c in done.values()))
    started = time.perf_counter()
    busy_from, busy_to = float("inf"), 0.0
    try:
        for record in executor.run(job):
            if not summary.chunks_done:
                summary.first_chunk_s = time.perf_counter() - started
            manifest.record(record)
            busy_from, busy_to = min(busy_from, record.began), max(busy_to, record.ended)
            summary.chunks_done += 1
            summary.processed += record.rows + record.rejected
            bar.update(record.rows + record.rejected)
    finally:
        bar.close()
    summary.written, summary.rejected = manifest.finish()
    summary.rows = summary.written + summary.rejected
    summary.elapsed_s = time.perf_counter() - started
    if busy_to > busy_from:
        summary.steady_rows_per_s = summary.processed / (busy_to - busy_from)
    return summary


def run_job(session, model: str, version: int, input_path: str | Path, output: str | Path, *, chunk_rows: int = 65536,
            batch_size: int = 1024, id_column: str | None = None, allow_nonfinite: bool = False,
            progress: bool = True) -> JobSummary:
    """Run ``session`` (of ``model:version``) over the input in this process, resuming a job already started
    in ``output`` with the same arguments (by either executor).

    Raises InvalidInput when ``output`` holds a different job or is a file, and for unreadable input."""
    settings = JobSettings(chunk_rows, batch_size, id_column, allow_nonfinite)
    job, manifest = open_job(model, version, session.signature, input_path, output, settings)
    return execute(job, manifest, LocalExecutor(session), progress=progress)


class LocalExecutor:
    """Runs chunks in this process on one engine session: the next chunk is read on a thread, and parts
    are written on another, while the engine runs the current one."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, job: BatchJob) -> Iterator[ChunkRecord]:
        writer = PartWriter(job.output, job.signature)
        try:
            for chunk in prefetched(job.pending_chunks()):
                began = time.time()
                chunk, outputs = run_chunk(self.session, chunk, job.settings.batch_size)
                writer.put(chunk, outputs, began)
                yield from writer.written()
        finally:
            writer.close()
        yield from writer.written()


def run_chunk(session, chunk: Chunk, batch_size: int) -> tuple[Chunk, dict[str, np.ndarray] | None]:
    """The chunk less the rows its pipeline refuses, and the session's outputs for the rest (None when no
    row is left), run ``batch_size`` rows at a time."""
    admit = getattr(session, "admit", None)  # a text or image pipeline checks each row (empty, too long, corrupt)
    if admit is not None:
        chunk = _admitted(chunk, admit)
    if not len(chunk.ids):
        return chunk, None
    return chunk, _run_batches(session, chunk.inputs, batch_size)


def prefetched(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Read the next chunk on a thread while the engine runs this one (Parquet decoding releases the GIL)."""
    ahead: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def read() -> None:
        try:
            for chunk in chunks:
                ahead.put(chunk)
            ahead.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            ahead.put(exc)

    threading.Thread(target=read, name="batch-reader", daemon=True).start()
    while True:
        item = ahead.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _admitted(chunk: Chunk, admit) -> Chunk:
    """The chunk without the rows its pipeline refuses (an empty or over-long text, a corrupt image), each
    set aside with the reason, so one bad row never fails its chunk."""
    import pyarrow as pa

    n = len(chunk.ids)
    keep = []
    for i in range(n):
        try:
            admit({k: v[i:i + 1] for k, v in chunk.inputs.items()})
            keep.append(i)
        except InvalidInput as exc:
            value = chunk.ids[i]
            chunk.rejects.append({"id": jsonable(value.as_py() if hasattr(value, "as_py") else value), "reason": str(exc)})
    if len(keep) == n:
        return chunk
    ids = chunk.ids.take(pa.array(keep, type=pa.int64())) if hasattr(chunk.ids, "take") else [chunk.ids[i] for i in keep]
    return Chunk(chunk.index, ids, {k: v[keep] for k, v in chunk.inputs.items()}, chunk.rejects)


def _run_batches(session, inputs: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(inputs.values())))
    parts = [session.run({k: v[i:i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
