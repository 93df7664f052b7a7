"""The batch job of ``batch.py`` on Ray Data: the same chunks, parts, rejects and manifest, run by a pool
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.deploy.batch import (JobSummary, _open_manifest, _run, _save_manifest, _write_part, finish_job,
                                    count_rows, job_fingerprint, read_chunks)
from leanserve.deploy.ray_cluster import RayUnavailable, connect
from leanserve.errors import InferenceError, InvalidInput, LeanserveError
from leanserve.repository import Repository

# Asked per actor and for the read task. Whole CPUs per actor on a 2-CPU machine leave none for the read
# task and Ray Data waits forever; a fraction lets them share, and each actor's engine runs one thread.
ACTOR_CPUS = 0.5
READ_CPUS = 0.25


@dataclass
class RayJobSummary(JobSummary):
    """A job's summary plus where Ray's time went."""

    ray_start_s: float = 0.0  # starting (or joining) Ray
    first_chunk_s: float = 0.0  # from the job's start on Ray to its first finished chunk: actors start, sessions load
    steady_rows_per_s: float = 0.0  # rows over the actors' busy window (first chunk begun to last ended)
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
    from tqdm import tqdm

    if chunk_rows < 1 or batch_size < 1:
        raise InvalidInput("--chunk-rows and --batch-size must be >= 1")
    repo = repo if isinstance(repo, Repository) else Repository(repo, create=False)
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise InvalidInput(f"{input_path}: no such input file or folder")
    artifact = repo.get(model, version)
    version = int(artifact.path.name)
    manifest = _open_manifest(output, job_fingerprint(model, version, input_path, chunk_rows, id_column, allow_nonfinite))
    done = {int(k) for k in manifest["chunks"]}
    cluster = connect(address, num_cpus)
    summary = RayJobSummary(chunks_skipped=len(done), ray_start_s=cluster.start_s)
    bar = tqdm(total=count_rows(input_path), unit="rows", unit_scale=True, desc=f"{model}:{version} (ray)",
               disable=not progress)
    bar.update(sum(c["rows"] + c["rejected"] for c in manifest["chunks"].values()))
    try:
        summary.actors = actors or max(1, int(cluster.cpus))
        dataset = _dataset(repo.root, model, version, artifact.signature, input_path, output, done, chunk_rows,
                           batch_size, id_column, allow_nonfinite, summary.actors)
        started = time.perf_counter()
        busy_from, busy_to = float("inf"), 0.0
        for record in _watched(dataset, stall_timeout_s, summary.actors):
            rows = record["rows"] + record["rejected"]
            if not summary.chunks_done:
                summary.first_chunk_s = time.perf_counter() - started
            busy_from, busy_to = min(busy_from, record.pop("began")), max(busy_to, record.pop("ended"))
            manifest["chunks"][str(record["index"])] = {k: record[k] for k in ("part", "rows", "rejected", "rejects")}
            _save_manifest(output, manifest)
            summary.chunks_done += 1
            summary.processed += rows
            bar.update(rows)
        summary.elapsed_s = time.perf_counter() - started
        if busy_to > busy_from:
            summary.steady_rows_per_s = summary.processed / (busy_to - busy_from)
    finally:
        bar.close()
        cluster.shutdown()
    finish_job(output, manifest, summary)
    return summary


def _dataset(root: Path, model: str, version: int, signature, input_path: Path, output: Path, done: set[int],
             chunk_rows: int, batch_size: int, id_column: str | None, allow_nonfinite: bool, actors: int):
    import logging

    import ray.data
    from ray.data import ActorPoolStrategy

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start-up notes and sizing tips, on every job
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours (tqdm) counts rows; Ray's would print over it
    context.print_on_execution_start = False
    source = _chunk_source(input_path, signature, chunk_rows, id_column, allow_nonfinite, done)
    return ray.data.read_datasource(source, num_cpus=READ_CPUS).map_batches(
        _ChunkRunner, batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        num_cpus=ACTOR_CPUS, fn_constructor_kwargs={"root": str(root), "model": model, "version": version,
                                                    "output": str(output), "batch_size": batch_size})


def _watched(dataset, stall_timeout_s: float, actors: int):
    """The dataset's result rows, raising RayUnavailable when none arrives for ``stall_timeout_s``:
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
        yield {"index": int(item["index"]), "part": item["part"] or None, "rows": int(item["rows"]),
               "rejected": int(item["rejected"]), "rejects": json.loads(item["rejects"]),
               "began": float(item["began"]), "ended": float(item["ended"])}


def _chunk_source(path: Path, signature, chunk_rows: int, id_column: str | None, allow_nonfinite: bool,
                  done: set[int]):
    """A Ray Data source of the input's chunks not yet done, one block each, read by ``read_chunks``.
    (Defined here because its base class comes from Ray, an optional extra.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read():
        import pyarrow as pa

        for chunk in read_chunks(path, signature, chunk_rows, id_column, allow_nonfinite):
            if chunk.index not in done:
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
    """One actor of the pool: loads the version once (engine threads: 1), runs chunks, writes their parts."""

    def __init__(self, root: str, model: str, version: int, output: str, batch_size: int) -> None:
        from leanserve.runtime import load_session

        repo = Repository(root, create=False)
        artifact = repo.get(model, version)
        runtime = repo.config(model).runtime
        self.session = load_session(artifact, replace(runtime, intra_op_threads=1, inter_op_threads=1))
        self.signature = artifact.signature
        self.output = Path(output)
        self.batch_size = batch_size

    def __call__(self, batch) -> dict[str, Any]:
        records = [self._one(pickle.loads(blob)) for blob in batch.column("chunk").to_pylist()]
        return {key: [r[key] for r in records] for key in ("index", "part", "rows", "rejected", "rejects", "began", "ended")}

    def _one(self, chunk) -> dict[str, Any]:
        began = time.time()  # wall clock: comparable across the actors of one machine (roughly, of a cluster)
        part = ""
        if len(chunk.ids):
            part = f"part-{chunk.index:05d}.parquet"
            outputs = _run(self.session, chunk.inputs, self.batch_size)
            _write_part(self.output / part, chunk.ids, outputs, self.signature)
        return {"index": chunk.index, "part": part, "rows": len(chunk.ids), "rejected": len(chunk.rejects),
                "rejects": json.dumps(chunk.rejects, default=_jsonable), "began": began, "ended": time.time()}


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
