"""A batch job over a repository's version: the version loaded here (local) or on Ray's actors (ray)."""

from __future__ import annotations

from pathlib import Path

from leanserve.errors import InvalidInput

EXECUTORS = ("local", "ray")


def predict_dataset(repo, name: str, version: int | str | None, input_path: str | Path, output: str | Path, *,
                    executor: str = "local", address: str | None = None, actors: int | None = None, **settings):
    """Run ``name:version`` of ``repo`` over a dataset into the folder ``output``, resuming a job started there.

    ``settings`` are ``JobSettings`` fields (chunk_rows, batch_size, id_column, allow_nonfinite);
    ``address`` and ``actors`` apply to ``executor="ray"``. Returns the JobSummary (RayJobSummary on Ray).
    Raises InvalidInput for an unknown executor, unreadable input or an output folder holding another
    job; ModelNotFound; what loading the version raises.
    """
    if executor not in EXECUTORS:
        raise InvalidInput(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "ray":
        from leanserve.deploy.ray_batch import run_job_ray

        return run_job_ray(repo, name, version, input_path, output, address=address, actors=actors, **settings)
    if address is not None or actors is not None:
        raise InvalidInput("--address and --actors apply to --executor ray")
    from leanserve.deploy.batch.runner import run_job
    from leanserve.runtime import load_session

    ref = repo.resolve(name, version)
    session = load_session(repo.get(ref.name, ref.version), repo.config(name).runtime)
    try:
        return run_job(session, name, ref.version, input_path, output, **settings)
    finally:
        session.close()
