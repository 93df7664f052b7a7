"""The executor protocol: any executor that writes parts and hands back their records, in any order, gives
the job the local executor gives, and a job can change executors between runs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leanserve.deploy.batch import JobSettings, LocalExecutor, execute, open_job, read_output, run_chunk, run_job
from leanserve.deploy.batch.output import write_part
from leanserve.runtime import load_session


class ReversedExecutor:
    """Runs the pending chunks last to first, as a pool of workers may finish them."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, job):
        for chunk in reversed(list(job.pending_chunks())):
            chunk, outputs = run_chunk(self.session, chunk, job.settings.batch_size)
            yield write_part(job.output, chunk, outputs, job.signature, began=0.0)


def write_rows(path, rows: int) -> None:
    x = np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)
    x[3, 1] = np.inf
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], **{f"f{j}": x[:, j] for j in range(4)}}), path)


def test_chunks_recorded_out_of_order_give_the_local_executors_output(tmp_path, affine_repo):
    session = load_session(affine_repo.get("affine"))
    write_rows(tmp_path / "in.parquet", 250)
    run_job(session, "affine", 1, tmp_path / "in.parquet", tmp_path / "local", chunk_rows=60, progress=False)
    job, manifest = open_job("affine", 1, session.signature, tmp_path / "in.parquet", tmp_path / "other",
                             JobSettings(chunk_rows=60))
    summary = execute(job, manifest, ReversedExecutor(session), progress=False)
    session.close()
    assert (summary.written, summary.rejected, summary.chunks_done) == (249, 1, 5)
    assert read_output(tmp_path / "other").equals(read_output(tmp_path / "local"))
    assert (tmp_path / "other" / "rejects.jsonl").read_text() == (tmp_path / "local" / "rejects.jsonl").read_text()


def test_a_job_resumed_by_another_executor_runs_only_the_chunks_left(tmp_path, affine_repo):
    session = load_session(affine_repo.get("affine"))
    write_rows(tmp_path / "in.parquet", 250)
    settings = JobSettings(chunk_rows=60)
    job, manifest = open_job("affine", 1, session.signature, tmp_path / "in.parquet", tmp_path / "out", settings)
    first_two = ReversedExecutor(session).run(job)
    for record in [next(first_two), next(first_two)]:  # chunks 4 and 3, then the run stops
        manifest.record(record)
    job, manifest = open_job("affine", 1, session.signature, tmp_path / "in.parquet", tmp_path / "out", settings)
    assert job.done == {3, 4}
    summary = execute(job, manifest, LocalExecutor(session), progress=False)
    session.close()
    assert (summary.chunks_skipped, summary.chunks_done, summary.written) == (2, 3, 249)
    assert read_output(tmp_path / "out").column("id").to_pylist() == [f"r{i}" for i in range(250) if i != 3]
