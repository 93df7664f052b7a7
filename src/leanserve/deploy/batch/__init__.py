"""Offline batch inference over datasets larger than memory, resumable after any interruption.

- ``readers`` (with ``tables``, ``arrays``, ``images``): the input cut into numbered chunks of model
  inputs, rows that cannot be used set aside with their id and the reason;
- ``manifest``: ``_job.json``, which job a folder holds and which chunks are written;
- ``runner``: the job, the ``Executor`` protocol, the local executor and ``run_job``
  (``deploy/ray_batch.py`` is the Ray executor);
- ``output``: the Parquet parts, written atomically, and ``read_output``.

The output is a folder: ``part-NNNNN.parquet``, ``rejects.jsonl`` and ``_job.json``. Each part is written to
a temporary name and renamed, then recorded in the manifest (also replaced atomically), so a job killed at
any instant (kill -9 included) leaves whole parts only; the next run with the same arguments skips the
recorded chunks and redoes the rest. No row is written twice: a part's name is its chunk number, and a
chunk's rejects are kept in the manifest with the chunk, not appended to a file that a redo would duplicate.
"""

from leanserve.deploy.batch.chunk import Chunk, ChunkRecord
from leanserve.deploy.batch.manifest import MANIFEST, REJECTS, JobManifest, JobSettings
from leanserve.deploy.batch.output import read_output
from leanserve.deploy.batch.readers import count_rows, is_dataset, read_chunks
from leanserve.deploy.batch.runner import (BatchJob, Executor, JobSummary, LocalExecutor, execute, open_job,
                                           run_chunk, run_job)

__all__ = ["MANIFEST", "REJECTS", "BatchJob", "Chunk", "ChunkRecord", "Executor", "JobManifest", "JobSettings",
           "JobSummary", "LocalExecutor", "count_rows", "execute", "is_dataset", "open_job", "read_chunks",
           "read_output", "run_chunk", "run_job"]
