"""`leanserve edge`: int8 ORT-format artifacts of a version, tested in a child process under a device
profile's threads and memory cap, registered as new versions with their operator config and report."""

import json

import numpy as np
import pytest

from conftest import affine_inputs
from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge import OPERATORS_FILE, REPORT_JSON, REPORT_MD, convert_to_ort
from leanserve.deploy.edge_device import PROFILES, DeviceProfile, run_on_device
from leanserve.errors import ModelLoadError
from leanserve.formats import read_model
from leanserve.model import load


def _edge(capsys, *argv):
    status = main(["edge", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def cnn_edge(tmp_path_factory, digits_cnn_onnx, digits):
    """The digits CNN imported as cnn:1, then `leanserve edge` run once with evaluation data (phone profile)."""
    folder = tmp_path_factory.mktemp("edge")
    _, x_test, _, y_test = digits
    np.savez(folder / "eval.npz", image=x_test, labels=y_test)
    repo = Repository(folder / "repo")
    repo.add(digits_cnn_onnx, "cnn")
    status = main(["edge", "cnn:1", "--target", "ort", "--profile", "phone", "--eval", str(folder / "eval.npz"),
                   "--max-accuracy-drop", "1%", "--seconds", "0.2", "--repo", str(repo.root)])
    return repo, status, folder


def test_ort_format_is_read_from_the_model_and_served_by_the_onnxruntime_engine(tmp_path, affine_onnx):
    ort_file, config = convert_to_ort(affine_onnx, tmp_path / "ort")
    source = read_model(ort_file)
    assert source.format == "ort"
    assert [s.describe() for s in source.signature.inputs] == ["x FP32 [-1, 4]"]
    assert [s.name for s in source.signature.outputs] == ["y", "s"]
    repo = Repository(tmp_path / "repo")
    repo.add(ort_file, "affine", attachments=[config])
    model = load("affine", repo=repo)
    assert model.predict(affine_inputs())["y"].tolist() == (2 * affine_inputs()["x"] + 1).tolist()


def test_a_file_that_is_not_ort_format_is_refused_with_a_reason(tmp_path):
    bad = tmp_path / "bad.ort"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelLoadError, match="not an ONNX Runtime"):
        read_model(bad)


def test_cnn_edge_artifact_is_int8_ort_at_most_30_percent_of_fp32_within_budget(cnn_edge):
    repo, status, _ = cnn_edge
    assert status == 0
    artifact = repo.get("cnn", 2)
    assert artifact.manifest.format == "ort" and artifact.model_path.name == "model.ort"
    report = json.loads((artifact.path / REPORT_JSON).read_text())
    assert report["int8"] and report["accuracy_checked"]
    # int8 weights alone are 24.5% of this CNN's fp32 file; the ORT flatbuffer's graph adds about 4 points
    assert report["artifact_bytes"] == artifact.model_path.stat().st_size
    assert report["size_ratio"] <= 0.30
    assert report["accuracy"]["drop"] <= report["accuracy"]["allowed_drop"] == pytest.approx(0.01)


def test_cnn_edge_version_carries_operator_config_and_reports(cnn_edge):
    repo, _, _ = cnn_edge
    artifact = repo.get("cnn", 2)
    assert {OPERATORS_FILE, REPORT_MD, REPORT_JSON} <= set(artifact.manifest.files)
    config_ops = (artifact.path / OPERATORS_FILE).read_text()
    report = json.loads((artifact.path / REPORT_JSON).read_text())
    assert report["operators"] and all(op.split(":")[1].split()[0] in config_ops for op in report["operators"])
    assert artifact.manifest.provenance.parent == "cnn:1"
    assert "of the fp32 original" in (artifact.path / REPORT_MD).read_text()


def test_cnn_edge_report_has_what_the_child_measured_under_the_profile(cnn_edge):
    repo, _, _ = cnn_edge
    report = json.loads((repo.get("cnn", 2).path / REPORT_JSON).read_text())
    assert report["profile"] == {"name": "phone", "threads": 1, "memory_mb": 512}
    device = report["device"]
    assert device["fits"] and 0 < device["peak_rss_mb"] < 512
    assert 0 < device["latency_p50_ms"] <= device["latency_p99_ms"] and device["runs"] >= 50
    assert report["host"]["model"]


def test_predict_runs_the_edge_version(cnn_edge, capsys, digits):
    repo, _, folder = cnn_edge
    np.savez(folder / "request.npz", image=digits[1][:3])
    assert main(["predict", "cnn:2", "--input", str(folder / "request.npz"), "--repo", str(repo.root)]) == 0
    logits = json.loads(capsys.readouterr().out)["logits"]
    assert logits["shape"] == [3, 10]


def test_without_eval_data_dynamic_int8_is_used_and_the_report_says_accuracy_was_not_checked(affine_repo, capsys):
    status, out, _ = _edge(capsys, "affine", "--profile", "tiny", "--seconds", "0.1", "--repo", str(affine_repo.root))
    assert status == 0
    report = json.loads((affine_repo.get("affine", 2).path / REPORT_JSON).read_text())
    assert report["recipe"] == "dynamic int8" and not report["accuracy_checked"]
    assert "accuracy: **not checked**" in out


def test_a_memory_cap_too_small_fails_clearly_and_registers_nothing(affine_repo, capsys, tmp_path):
    status, out, err = _edge(capsys, "affine", "--memory-mb", "64", "--report-dir", str(tmp_path / "report"),
                             "--repo", str(affine_repo.root))
    assert status == 1
    assert "did not run within the phone (1 thread, 64 MB) profile" in err and "raise --memory-mb" in err
    assert "**did not run within the profile's 64 MB memory cap" in (tmp_path / "report" / REPORT_MD).read_text()
    assert "did not run" in out
    assert affine_repo.versions("affine") == [1]


def test_run_on_device_sets_the_profile_threads_and_reports_peak_memory(tmp_path, affine_onnx):
    ort_file, _ = convert_to_ort(affine_onnx, tmp_path)
    run = run_on_device(ort_file, affine_inputs(8), DeviceProfile("two", threads=2, memory_mb=1024), min_time_s=0.05)
    assert run.fits and run.error is None and run.peak_rss_mb > 1


@pytest.mark.parametrize("argv, message", [
    (["--target", "coreml"], "unknown edge target 'coreml'; choose one of ort, executorch"),
    (["--profile", "watch"], "unknown device profile 'watch'; choose one of phone, pi4, tiny"),
    (["--target", "executorch"], "needs ExecuTorch, which is not installed here"),
])
def test_bad_targets_and_profiles_fail_with_one_line_and_change_nothing(affine_repo, capsys, argv, message):
    status, _, err = _edge(capsys, "affine", *argv, "--repo", str(affine_repo.root))
    assert status == 1 and message in err
    assert affine_repo.versions("affine") == [1]


def test_a_version_that_is_not_onnx_is_refused(tmp_path, affine_onnx, capsys):
    ort_file, _ = convert_to_ort(affine_onnx, tmp_path / "ort")
    repo = Repository(tmp_path / "repo")
    repo.add(ort_file, "affine")
    status, _, err = _edge(capsys, "affine", "--repo", str(repo.root))
    assert status == 1 and "converts ONNX versions; affine:1 is ort" in err
    assert repo.versions("affine") == [1]


def test_profiles_match_the_issue():
    assert {(p.name, p.threads, p.memory_mb) for p in PROFILES.values()} == {
        ("phone", 1, 512), ("pi4", 4, 1024), ("tiny", 1, 256)}
