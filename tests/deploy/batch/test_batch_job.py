"""Offline batch jobs (`leanserve predict` on a dataset): chunked reading of every input kind, rejects with
reasons, atomic parts, and resuming after a kill -9 without a duplicated or missing row."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import wait_until
from leanserve.cli import main
from leanserve.deploy.batch import read_output, run_job
from leanserve.errors import InvalidInput
from leanserve.runtime import load_session


@pytest.fixture
def affine(affine_repo):
    session = load_session(affine_repo.get("affine"))
    yield affine_repo, session
    session.close()


def table(rows: int, seed: int = 0) -> pa.Table:
    x = np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)
    return pa.table({"id": [f"row-{i}" for i in range(rows)], **{f"f{j}": x[:, j] for j in range(4)}})


def test_a_parquet_job_writes_every_row_keyed_by_id(tmp_path, affine):
    repo, session = affine
    data = table(1000)
    pq.write_table(data, tmp_path / "in.parquet")
    summary = run_job(session, "affine", 1, tmp_path / "in.parquet", tmp_path / "out", chunk_rows=300, batch_size=64,
                      progress=False)
    assert (summary.written, summary.rejected, summary.chunks_done) == (1000, 0, 4)
    out = read_output(tmp_path / "out")
    assert out.column("id").to_pylist() == data.column("id").to_pylist()
    x = np.column_stack([data.column(f"f{j}").to_numpy() for j in range(4)])
    assert np.allclose(np.stack(out.column("y").to_pylist()), 2 * x + 1, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "_job.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet", "rejects.jsonl"]


def test_bad_rows_go_to_the_rejects_file_with_their_id_and_reason(tmp_path, affine):
    _, session = affine
    (tmp_path / "in.csv").write_text("id,a,b,c,d\n1,1,2,3,4\n2,1,two,3,4\n3,nan,2,3,4\n4,1,2,3,\n5,5,6,7,8\n")
    summary = run_job(session, "affine", 1, tmp_path / "in.csv", tmp_path / "out", chunk_rows=2, progress=False)
    assert (summary.written, summary.rejected) == (2, 3)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == [2, 3, 4]
    assert "column 'b': not a number ('two')" in rejects[0]["reason"]
    assert rejects[1]["reason"] == "column 'a': missing value" and rejects[2]["reason"] == "column 'd': missing value"
    assert read_output(tmp_path / "out").column("id").to_pylist() == [1, 5]


def test_nan_rows_are_rejected_unless_allowed(tmp_path, affine):
    _, session = affine
    data = table(4)
    values = data.column("f2").to_numpy().copy()
    values[1] = np.nan
    pq.write_table(data.set_column(3, "f2", pa.array(values)), tmp_path / "in.parquet")
    summary = run_job(session, "affine", 1, tmp_path / "in.parquet", tmp_path / "strict", progress=False)
    assert (summary.written, summary.rejected) == (3, 1)
    assert "NaN or Inf" in (tmp_path / "strict" / "rejects.jsonl").read_text()
    summary = run_job(session, "affine", 1, tmp_path / "in.parquet", tmp_path / "lenient", allow_nonfinite=True, progress=False)
    assert (summary.written, summary.rejected) == (4, 0)


def test_json_lines_with_one_column_per_input(tmp_path, affine):
    _, session = affine
    lines = [json.dumps({"x": [i, i, i, i]}) for i in range(5)] + [json.dumps({"x": [1, 2, 3]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    summary = run_job(session, "affine", 1, tmp_path / "in.jsonl", tmp_path / "out", progress=False)
    assert (summary.written, summary.rejected) == (5, 1)
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["id"] == 5 and "input 'x'" in reject["reason"]


def test_arrays_and_image_folders_are_datasets_too(tmp_path, affine, repo, digits_cnn_onnx):
    from PIL import Image

    _, session = affine
    np.save(tmp_path / "rows.npy", np.ones((10, 4), np.float32))
    assert run_job(session, "affine", 1, tmp_path / "rows.npy", tmp_path / "out-npy", chunk_rows=4, progress=False).written == 10
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.eye(28) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    repo.add(digits_cnn_onnx, "cnn")
    cnn = load_session(repo.get("cnn"))
    summary = run_job(cnn, "cnn", 1, folder, tmp_path / "out-img", progress=False)
    assert (summary.written, summary.rejected) == (3, 1)
    assert read_output(tmp_path / "out-img").column("id").to_pylist() == ["img0.png", "img1.png", "img2.png"]


def test_an_output_folder_of_another_job_or_of_other_files_is_refused(tmp_path, affine):
    _, session = affine
    pq.write_table(table(10), tmp_path / "a.parquet")
    pq.write_table(table(12, seed=1), tmp_path / "b.parquet")
    run_job(session, "affine", 1, tmp_path / "a.parquet", tmp_path / "out", progress=False)
    with pytest.raises(InvalidInput, match="holds a different job.*input"):
        run_job(session, "affine", 1, tmp_path / "b.parquet", tmp_path / "out", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="not a leanserve batch job"):
        run_job(session, "affine", 1, tmp_path / "a.parquet", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_wrong_width_and_unreadable_input_are_one_clear_error(tmp_path, affine):
    _, session = affine
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), tmp_path / "narrow.parquet")
    with pytest.raises(InvalidInput, match="2 feature columns, but input 'x' takes 4"):
        run_job(session, "affine", 1, tmp_path / "narrow.parquet", tmp_path / "o1", progress=False)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InvalidInput, match="unreadable parquet input"):
        run_job(session, "affine", 1, tmp_path / "bad.parquet", tmp_path / "o2", progress=False)
    lines = [json.dumps({"x": [1, 2, 3, 4]})] * 3 + [json.dumps({"x": "four numbers"})]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput, match="mixed.jsonl"):
        run_job(session, "affine", 1, tmp_path / "mixed.jsonl", tmp_path / "o3", progress=False)


def test_predict_command_runs_a_dataset_and_says_what_it_did(capsys, tmp_path, affine_repo):
    pq.write_table(table(50), tmp_path / "in.parquet")
    argv = ["predict", "affine", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--repo", str(affine_repo.root), "--chunk-rows", "20"]
    assert main(argv) == 0
    assert "50 rows written, 0 rejected" in capsys.readouterr().out
    assert main(argv) == 0
    assert "3 chunk(s) already done by an earlier run" in capsys.readouterr().out
    assert main(argv[:4] + ["--repo", str(affine_repo.root)]) != 0
    assert "needs --output FOLDER" in capsys.readouterr().err


def test_a_job_killed_mid_run_resumes_without_a_duplicated_or_missing_row(tmp_path, affine_repo):
    rows = 60_000
    pq.write_table(table(rows), tmp_path / "in.parquet")
    argv = [sys.executable, "-m", "leanserve.cli", "predict", "affine", "--input", str(tmp_path / "in.parquet"),
            "--output", str(tmp_path / "out"), "--repo", str(affine_repo.root), "--chunk-rows", "500", "--batch-size", "1"]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def chunks_done() -> int:
        try:
            return len(json.loads((tmp_path / "out" / "_job.json").read_text())["chunks"])
        except (OSError, ValueError):
            return 0

    wait_until(lambda: chunks_done() >= 3, timeout_s=60, what="the job to finish a few chunks")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = chunks_done()
    assert killed_at < rows // 500, "the job finished before it was killed: make it longer"
    done = subprocess.run(argv[:-2] + ["--batch-size", "4096"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{killed_at} chunk(s) already done" in done.stdout
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert len(ids) == rows and len(set(ids)) == rows and ids == [f"row-{i}" for i in range(rows)]
    assert not list((tmp_path / "out").glob("*.tmp"))
