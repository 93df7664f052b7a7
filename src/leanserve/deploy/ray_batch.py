"""The Ray executor of ``deploy/batch/``: batch jobs on Ray Data: the same chunks, parts, rejects and manifest, run by a pool
of actors (one engine session each) on a local Ray or an existing cluster.

One read task runs ``read_chunks`` (the local executor's reader, so chunk boundaries, ids and rejects are
the same) and hands each chunk on as one block; ``map_batches`` runs each chunk on an actor of an
``ActorPoolStrategy`` pool, which writes the chunk's part atomically and returns its manifest record; this
process records each in ``_job.json`` as it arrives. A job is therefore resumable across executors: a
job started locally continues on Ray and the reverse, since the manifest does not name the executor.

On a cluster the input and output paths must be the same on every node (a shared file system), and
leanserve must be installed on the nodes.

Ray's fixed cost is large on one small machine (its start, the actors' start and the hand-off of every
chunk between processes), so the summary gives Ray's start-up, the wait for the first chunk and the
steady rows/s apart; the local executor stays the default.
"""

from __future__ import annotations

import json
import pickle
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from leanserve.deploy.batch import BatchJob, ChunkRecord, JobSettings, JobSummary, execute, open_job, run_chunk
from leanserve.deploy.batch.chunk import jsonable
from leanserve.deploy.batch.output import write_part
from leanserve.deploy.ray_cluster import RayUnavailable, connect
from leanserve.errors import InferenceError, LeanserveError
from leanserve.repository import Repository

# Asked per actor and for the read task. Whole CPUs per actor on a 2-CPU machine leave none for the read
# task and Ray Data waits forever; a fraction lets them share, and each actor's engine runs one thread.
ACTOR_CPUS = 0.5
READ_CPUS = 0.25


@dataclass
class RayJobSummary(JobSummary):
    """A job's summary plus Ray's start-up and pool size (the first chunk's wait shows actors starting and
    sessions loading)."""

    ray_start_s: float = 0.0  # starting (or joining) Ray
    actors: int = 0


def run_job_ray(repo: Repository | str | Path, model: str, version: int | str | None, input_path: str | Path,
                output: str | Path, *, chunk_rows: int = 65536, batch_size: int = 1024, id_column: str | None = None,
                allow_nonfinite: bool = False, address: str | None = None, num_cpus: int | None = None,
                actors: int | None = None, stall_timeout_s: float = 600.0, progress: bool = True) -> RayJobSummary:
    """Run ``model:version`` of ``repo`` over the input on Ray Data, resuming a job in ``output`` started by
    either executor with the same arguments.

    ``address`` joins a cluster (else a local Ray with ``num_cpus``, default all); ``actors`` sets the pool
    size (default: one per CPU). Raises RayUnavailable (Ray missing, cluster unreachable, no progress for
    ``stall_timeout_s``), InvalidInput (bad input or output, as the local job) and InferenceError."""
    settings = JobSettings(chunk_rows, batch_size, id_column, allow_nonfinite)
    repo = repo if isinstance(repo, Repository) else Repository(repo, create=False)
    artifact = repo.get(model, version)
    job, manifest = open_job(model, int(artifact.path.name), artifact.signature, input_path, output, settings)
    cluster = connect(address, num_cpus)  # after the job is checked: a bad --output fails without starting Ray
    try:
        executor = RayExecutor(repo.root, actors or max(1, int(cluster.cpus)), stall_timeout_s)
        summary = RayJobSummary(ray_start_s=cluster.start_s, actors=executor.actors)
        return execute(job, manifest, executor, progress=progress, summary=summary, label=" (ray)")
    finally:
        cluster.shutdown()


class RayExecutor:
    """Runs a job's chunks on a pool of ``actors`` Ray actors (one engine session each) of an already
    connected Ray; raises RayUnavailable when no chunk finishes for ``stall_timeout_s``."""

    def __init__(self, root: Path, actors: int, stall_timeout_s: float = 600.0) -> None:
        self.root, self.actors, self.stall_timeout_s = Path(root), actors, stall_timeout_s

    def run(self, job: BatchJob) -> Iterator[ChunkRecord]:
        return _watched(_dataset(self.root, job, self.actors), self.stall_timeout_s, self.actors)


def _dataset(root: Path, job: BatchJob, actors: int):
    import logging

    import ray.data
    from ray.data import ActorPoolStrategy

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start-up notes and sizing tips, on every job
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours (tqdm) counts rows; Ray's would print over it
    context.print_on_execution_start = False
    return ray.data.read_datasource(_chunk_source(job), num_cpus=READ_CPUS).map_batches(
        _ChunkRunner, batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        num_cpus=ACTOR_CPUS, fn_constructor_kwargs={"root": str(root), "job": job})


def _watched(dataset, stall_timeout_s: float, actors: int) -> Iterator[ChunkRecord]:
    """The records of the dataset's chunks, raising RayUnavailable when none arrives for ``stall_timeout_s``:
    a job whose actors cannot be placed waits silently forever in Ray Data."""
    results: queue.Queue = queue.Queue(maxsize=64)
    end = object()

    def consume() -> None:
        try:
            for row in dataset.iter_rows():
                results.put(row)
            results.put(end)
        except BaseException as exc:  # handed to the job's thread and raised there
            results.put(exc)

    threading.Thread(target=consume, name="ray-job-results", daemon=True).start()
    while True:
        try:
            item = results.get(timeout=stall_timeout_s)
        except queue.Empty:
            raise RayUnavailable(f"no chunk finished within {stall_timeout_s:g} s: the cluster may lack CPUs for "
                                 f"{actors} actors of {ACTOR_CPUS} CPU plus a read task of {READ_CPUS} "
                                 "(ray status shows what is free); lower --actors") from None
        if item is end:
            return
        if isinstance(item, LeanserveError):  # Ray re-raises an actor's error as an instance of its class
            raise item
        if isinstance(item, BaseException):
            raise InferenceError(f"the Ray job failed: {str(item).strip().splitlines()[-1]}") from item
        yield ChunkRecord(int(item["index"]), item["part"] or None, int(item["rows"]), int(item["rejected"]),
                          json.loads(item["rejects"]), float(item["began"]), float(item["ended"]))


def _chunk_source(job: BatchJob):
    """A Ray Data source of the job's pending chunks, one block each, read by the local executor's reader.
    (Defined here because its base class comes from Ray, an optional extra.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read():
        import pyarrow as pa

        for chunk in job.pending_chunks():
            # A chunk is our own object between our own processes; Ray would pickle it either way.
            yield pa.table({"index": [chunk.index], "chunk": [pickle.dumps(chunk, protocol=5)]})

    class ChunkSource(Datasource):
        def get_name(self) -> str:
            return "LeanserveChunks"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
            # One task: chunk boundaries come from reading the input in order, as the local executor does.
            return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))]

    return ChunkSource()


class _ChunkRunner:
    """One actor of the pool: loads the version once (engine threads: 1), runs chunks as the local executor
    does (``run_chunk``: the pipeline's admission, then batches), writes their parts."""

    def __init__(self, root: str, job: BatchJob) -> None:
        from leanserve.runtime import load_session

        repo = Repository(root, create=False)
        artifact = repo.get(job.model, job.version)
        runtime = repo.config(job.model).runtime
        self.session = load_session(artifact, replace(runtime, intra_op_threads=1, inter_op_threads=1))
        self.job = job

    def __call__(self, batch) -> dict[str, Any]:
        records = [self._one(pickle.loads(blob)) for blob in batch.column("chunk").to_pylist()]
        return {key: [r[key] for r in records] for key in ("index", "part", "rows", "rejected", "rejects", "began", "ended")}

    def _one(self, chunk) -> dict[str, Any]:
        began = time.time()  # wall clock: comparable across the actors of one machine (roughly, of a cluster)
        chunk, outputs = run_chunk(self.session, chunk, self.job.settings.batch_size)
        record = write_part(self.job.output, chunk, outputs, self.job.signature, began)
        return {"index": record.index, "part": record.part or "", "rows": record.rows, "rejected": record.rejected,
                "rejects": json.dumps(record.rejects, default=jsonable), "began": record.began, "ended": record.ended}
