"""The Ray executor (batch jobs on Ray Data) and Ray Serve, on one local Ray with 2 CPUs per module."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, make_affine_model, wait_until

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'leanserve[ray]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def ray_cluster():
    from leanserve.deploy.ray_cluster import connect

    cluster = connect(num_cpus=2)
    yield cluster
    ray.shutdown()


@pytest.fixture(scope="module")
def affine_job(tmp_path_factory):
    """A repository with the affine model and a 1,000-row Parquet table with two bad rows."""
    import leanserve

    work = tmp_path_factory.mktemp("rayjob")
    make_affine_model(work / "affine.onnx")
    repo = leanserve.Repository(work / "repo")
    repo.add(work / "affine.onnx", "affine")
    x = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    x[5, 2] = np.nan
    columns = {f"f{i}": pa.array(x[:, i]) for i in range(4)}
    columns["f1"] = pa.array([None if i == 700 else float(v) for i, v in enumerate(x[:, 1])], pa.float32())
    pq.write_table(pa.table({"id": np.arange(1000) * 10, **columns}), work / "rows.parquet", row_group_size=300)
    return repo, work / "rows.parquet", work


def _local_job(repo, rows: Path, output: Path) -> None:
    from leanserve.deploy.batch import run_job
    from leanserve.runtime import load_session

    session = load_session(repo.get("affine"))
    run_job(session, "affine", 1, rows, output, chunk_rows=128, progress=False)
    session.close()


def test_ray_job_writes_what_the_local_job_writes(ray_cluster, affine_job, tmp_path):
    from leanserve.deploy.batch import MANIFEST, read_output
    from leanserve.deploy.ray_batch import run_job_ray

    repo, rows, _ = affine_job
    _local_job(repo, rows, tmp_path / "local")
    summary = run_job_ray(repo, "affine", None, rows, tmp_path / "ray", chunk_rows=128, progress=False, stall_timeout_s=120)

    assert (summary.written, summary.rejected, summary.chunks_done) == (998, 2, 8)
    assert read_output(tmp_path / "ray").equals(read_output(tmp_path / "local"))
    assert (tmp_path / "ray" / "rejects.jsonl").read_text() == (tmp_path / "local" / "rejects.jsonl").read_text()
    local, on_ray = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("local", "ray"))
    assert on_ray["chunks"] == local["chunks"] and on_ray["job"] == local["job"]
    assert summary.ray_start_s == 0.0  # the module's Ray was reused, not started again
    assert summary.steady_rows_per_s > 0


def test_ray_job_finishes_a_job_the_local_executor_started(ray_cluster, affine_job, tmp_path):
    from leanserve.deploy.batch import MANIFEST, read_output
    from leanserve.deploy.ray_batch import run_job_ray

    repo, rows, _ = affine_job
    _local_job(repo, rows, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    manifest = json.loads((tmp_path / "cut" / MANIFEST).read_text())
    for index in ("3", "4", "7"):  # as if killed before these chunks were recorded
        (tmp_path / "cut" / manifest["chunks"].pop(index)["part"]).unlink()
    manifest["finished"] = False
    (tmp_path / "cut" / MANIFEST).write_text(json.dumps(manifest))

    summary = run_job_ray(repo, "affine", 1, rows, tmp_path / "cut", chunk_rows=128, progress=False, stall_timeout_s=120)

    assert (summary.chunks_skipped, summary.chunks_done) == (5, 3)
    assert read_output(tmp_path / "cut").equals(read_output(tmp_path / "full"))


def test_serve_on_ray_answers_tritonclient_with_a_version_deployment(affine_job):
    # A real `leanserve serve --executor ray` process: Ray Serve's router threads in the process that
    # holds the handles outlive serve.shutdown() and may end that process when Ray shuts down (Ray
    # 2.55: "the core worker has already been shutdown ... the process will exit"), so not in pytest's.
    import tritonclient.http as httpclient

    repo, _, _ = affine_job
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "serve", str(repo.root), "--executor", "ray",
                               "--port", str(port), "--grpc-port", "0", "--no-monitor", "--no-access-log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        wait_until(lambda: server.poll() is not None or _ready(client), timeout_s=180, interval_s=0.5,
                   what="the version deployment")
        assert server.poll() is None, server.stderr.read()[-2000:]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        request = httpclient.InferInput("x", list(x.shape), "FP32")
        request.set_data_from_numpy(x, binary_data=True)
        result = client.infer("affine", [request], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])
        np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1)
        assert client.get_model_metadata("affine")["platform"].startswith("onnx")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _ready(client) -> bool:
    try:
        return client.is_model_ready("affine")
    except Exception:  # tritonclient raises its own errors while the server starts
        return False


def test_predict_with_ray_missing_names_the_extra(affine_job, tmp_path, monkeypatch, capsys):
    from leanserve.cli import main

    repo, rows, _ = affine_job
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["predict", "affine", "--input", str(rows), "--output", str(tmp_path / "out"), "--executor", "ray",
                 "--repo", str(repo.root)])

    assert code == 1
    assert "pip install 'leanserve[ray]'" in capsys.readouterr().err


def test_serve_with_ray_missing_names_the_extra(affine_job, monkeypatch, capsys):
    from leanserve.cli import main

    repo, _, _ = affine_job
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["serve", str(repo.root), "--executor", "ray", "--port", str(free_port()), "--grpc-port", "0"])

    assert code == 1
    assert "pip install 'leanserve[ray]'" in capsys.readouterr().err


def test_predict_on_an_unreachable_cluster_says_so(affine_job, tmp_path, capsys):
    from leanserve.cli import main

    repo, rows, _ = affine_job
    address = f"127.0.0.1:{free_port()}"
    code = main(["predict", "affine", "--input", str(rows), "--output", str(tmp_path / "out"), "--executor", "ray",
                 "--address", address, "--repo", str(repo.root)])

    assert code == 1
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in err and "ray start --head" in err
