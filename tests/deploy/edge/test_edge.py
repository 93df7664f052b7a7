"""`leanserve edge`: int8 ORT-format artifacts and ExecuTorch programs of a version, tested in a child process
under a device profile's threads and memory cap, registered as new versions with their report."""

import json
import sys

import numpy as np
import pytest

from conftest import affine_inputs
from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge.build import REPORT_JSON, REPORT_MD
from leanserve.deploy.edge.ort_format import OPERATORS_FILE, convert_to_ort
from leanserve.deploy.edge.device import PROFILES, DeviceProfile, run_on_device
from leanserve.errors import ModelLoadError, UnsupportedFormat
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


def test_cnn_edge_version_reports_held_out_accuracy_beside_the_selection_figure(cnn_edge, digits):
    from leanserve.holdout import split_holdout
    from leanserve.runtime import load_file

    repo, status, _ = cnn_edge
    _, x_test, _, y_test = digits
    artifact = repo.get("cnn", 2)
    metrics = artifact.manifest.metrics
    assert {"holdout_top1", "holdout_top1_drop", "baseline_holdout_top1", "selection_top1", "selection_top1_drop"} <= set(metrics)
    held = split_holdout({"image": x_test, "labels": y_test}, 0.3, 0).holdout  # the command's default split
    assert metrics["holdout_split"] == {"source": "split", "selection_rows": len(x_test) - len(held["labels"]),
                                        "holdout_rows": len(held["labels"]), "seed": 0, "holdout_fraction": 0.3,
                                        "stratified": True}
    session = load_file(artifact.model_path)
    logits = session.run({"image": held["image"]})["logits"]
    session.close()
    assert metrics["holdout_top1"] == pytest.approx(np.mean(logits.argmax(1) == held["labels"]), abs=1e-6)
    report = json.loads((artifact.path / REPORT_JSON).read_text())
    assert report["accuracy"]["artifact"] == pytest.approx(metrics["holdout_top1"], abs=1e-6)
    assert "accuracy above: held-out rows the choice never saw (selection" in (artifact.path / REPORT_MD).read_text()


def test_edge_reports_accuracy_on_the_holdout_file_when_given(affine_repo, capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(40, 4)).astype(np.float32))
    np.savez(tmp_path / "held.npz", x=rng.normal(size=(12, 4)).astype(np.float32))
    status, _, err = _edge(capsys, "affine", "--eval", str(tmp_path / "eval.npz"), "--holdout", str(tmp_path / "held.npz"),
                           "--profile", "tiny", "--seconds", "0.1", "--repo", str(affine_repo.root))
    assert status == 0, err
    split = affine_repo.get("affine", 2).manifest.metrics["holdout_split"]
    assert (split["source"], split["selection_rows"], split["holdout_rows"]) == ("given", 40, 12)


def test_edge_refuses_a_holdout_file_without_evaluation_data(affine_repo, capsys, tmp_path):
    np.savez(tmp_path / "held.npz", x=np.zeros((20, 4), np.float32))
    status, _, err = _edge(capsys, "affine", "--holdout", str(tmp_path / "held.npz"), "--repo", str(affine_repo.root))
    assert status == 1 and "--holdout DATA needs --eval DATA" in err
    assert affine_repo.versions("affine") == [1]


def test_edge_refuses_evaluation_data_too_small_to_hold_rows_out(affine_repo, capsys, tmp_path):
    np.savez(tmp_path / "eval.npz", x=np.zeros((20, 4), np.float32))
    status, _, err = _edge(capsys, "affine", "--eval", str(tmp_path / "eval.npz"), "--repo", str(affine_repo.root))
    assert status == 1 and "evaluation data has 20 rows" in err and "at least 10" in err
    assert affine_repo.versions("affine") == [1]


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


# --- ExecuTorch -------------------------------------------------------------------------------------

def _with_program(repo, onnx_path):
    from leanserve.torch_source import PROGRAM_FILE

    return repo.add(onnx_path, "cnn", attachments=[onnx_path.parent / PROGRAM_FILE])


@pytest.fixture(scope="module")
def pte_edge(tmp_path_factory, digits_cnn_onnx, digits):
    """cnn:1 (ONNX, with its torch.export program), then `leanserve edge --target executorch` with evaluation data."""
    pytest.importorskip("executorch")
    folder = tmp_path_factory.mktemp("pte")
    _, x_test, _, y_test = digits
    np.savez(folder / "eval.npz", image=x_test, labels=y_test)
    repo = Repository(folder / "repo")
    _with_program(repo, digits_cnn_onnx)
    status = main(["edge", "cnn:1", "--target", "executorch", "--eval", str(folder / "eval.npz"), "--seconds", "0.2",
                   "--repo", str(repo.root)])
    return repo, status, folder


def test_executorch_edge_version_is_an_int8_pte_lowered_to_xnnpack_within_budget(pte_edge):
    repo, status, _ = pte_edge
    assert status == 0
    artifact = repo.get("cnn", 2)
    assert artifact.manifest.format == "executorch" and artifact.manifest.default_runtime == "executorch"
    assert {"model.pte", "model.pte.json", REPORT_MD, REPORT_JSON} <= set(artifact.manifest.files)
    report = json.loads((artifact.path / REPORT_JSON).read_text())
    assert report["target"] == "executorch" and report["int8"] and report["recipe"].startswith("static int8")
    assert report["executorch_version"] and artifact.manifest.provenance.parent == "cnn:1"
    assert report["accuracy"]["drop"] <= report["accuracy"]["allowed_drop"] == pytest.approx(0.01)
    # int8 weights are a quarter of fp32; the program's graph and scales add about 2 points
    assert report["artifact_bytes"] == artifact.model_path.stat().st_size and report["size_ratio"] <= 0.30
    assert report["operators"] and all(op.endswith("delegated") for op in report["operators"])
    assert any(op.startswith("aten_convolution") for op in report["operators"])


def test_executorch_edge_report_has_the_programs_memory_and_latency_under_the_profile(pte_edge):
    repo, _, _ = pte_edge
    report = json.loads((repo.get("cnn", 2).path / REPORT_JSON).read_text())
    device = report["device"]
    assert device["fits"] and 0 < device["runtime_rss_mb"] < device["peak_rss_mb"]
    assert 0 < device["latency_p50_ms"] <= device["latency_p99_ms"] and device["runs"] >= 50
    markdown = (repo.get("cnn", 2).path / REPORT_MD).read_text()
    assert "peak memory of the program" in markdown and "of 512 MB" in markdown and "libtorch" in markdown


def test_executorch_version_runs_in_its_engine_and_agrees_with_the_onnx_version(pte_edge, digits):
    from leanserve.runtime import load_session

    repo, _, _ = pte_edge
    x = digits[1][:50]
    pte = load_session(repo.get("cnn", 2))
    assert pte.engine == "executorch"
    int8 = pte.run({"image": x})["logits"]
    fp32 = load_session(repo.get("cnn", 1)).run({"image": x})["logits"]
    assert int8.shape == fp32.shape == (50, 10)
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.96
    assert np.abs(int8 - fp32).max() < 0.1 * np.abs(fp32).max()


def test_predict_runs_the_executorch_version(pte_edge, capsys, digits):
    repo, _, folder = pte_edge
    np.savez(folder / "request.npz", image=digits[1][:3])
    assert main(["predict", "cnn:2", "--input", str(folder / "request.npz"), "--repo", str(repo.root)]) == 0
    assert json.loads(capsys.readouterr().out)["logits"]["shape"] == [3, 10]


def test_the_server_answers_with_the_executorch_version(pte_edge, live_server_factory, digits):
    import httpx

    repo, _, _ = pte_edge
    assert repo.state("cnn") == {1: "serving", 2: "registered"}  # an edge artifact is never served unasked
    repo.promote("cnn", 2)
    server = live_server_factory(repo.root)
    image = digits[1][:2]
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    response = httpx.post(server.url + "/v2/models/cnn/versions/2/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "logits" and output["shape"] == [2, 10]


def test_a_file_that_is_not_an_executorch_program_is_refused_with_a_reason(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not an ExecuTorch program"):
        read_model(bad)


def test_without_an_int8_program_in_budget_the_fp32_program_is_chosen_and_matches_onnx(cnn_repo, digits_cnn_onnx,
                                                                                        digits, tmp_path):
    pytest.importorskip("executorch")
    from leanserve.deploy.edge.executorch import choose_program
    from leanserve.deploy.edge.report import Accuracy
    from leanserve.runtime import load_file

    ref = _with_program(cnn_repo, digits_cnn_onnx)
    artifact = cnn_repo.get("cnn", ref.version)
    data = {"image": digits[1][:64], "labels": digits[3][:64]}
    program = choose_program(artifact, tmp_path, data=data, calib=None,
                             check=lambda path: Accuracy("top1", 0.9, 0.5, 0.4, 0.01))  # every int8 program too lossy
    assert not program.recipe.int8 and "no int8 program stayed within the budget" in program.notes[-1]
    fp32 = load_file(program.path).run({"image": data["image"]})["logits"]
    onnx = load_file(digits_cnn_onnx).run({"image": data["image"]})["logits"]
    assert np.allclose(fp32, onnx, atol=1e-4)


def test_executorch_target_without_a_pytorch_program_says_how_to_get_one(cnn_repo, capsys):
    pytest.importorskip("executorch")
    status, _, err = _edge(capsys, "cnn", "--target", "executorch", "--repo", str(cnn_repo.root))
    assert status == 1 and "cnn:1 (onnx) has none" in err and "leanserve export FILE.py:FUNC --name NAME" in err
    assert "--target ort" in err and cnn_repo.versions("cnn") == [1]


def test_a_program_executorch_cannot_lower_fails_with_what_to_do(tmp_path, capsys):
    pytest.importorskip("executorch")
    import torch

    class Positions(torch.nn.Module):  # a data-dependent output size: no memory plan can hold it
        def forward(self, x):
            return torch.nonzero(x > 0).to(torch.float32)

    torch.export.save(torch.export.export(Positions(), (torch.ones(1, 4),)), str(tmp_path / "positions.pt2"))
    repo = Repository(tmp_path / "repo")
    repo.add(tmp_path / "positions.pt2", "positions")
    status, _, err = _edge(capsys, "positions", "--target", "executorch", "--repo", str(repo.root))
    assert status == 1 and "ExecuTorch cannot lower this model" in err and "use --target ort" in err
    assert repo.versions("positions") == [1]


def test_without_executorch_installed_the_target_and_the_engine_name_the_edge_extra(pte_edge, monkeypatch, capsys):
    import importlib.util

    from leanserve.runtime import load_session

    repo, _, _ = pte_edge
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else find_spec(name, *a))
    status, _, err = _edge(capsys, "cnn:1", "--target", "executorch", "--repo", str(repo.root))
    assert status == 1 and "needs ExecuTorch, which is not installed here: pip install 'leanserve[edge]'" in err
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # an import of it now raises ImportError
    monkeypatch.delitem(sys.modules, "leanserve.runtime.executorch", raising=False)
    with pytest.raises(UnsupportedFormat, match=r"pip install 'leanserve\[edge\]'"):
        load_session(repo.get("cnn", 2))
    assert repo.versions("cnn") == [1, 2]


def _one_row_only_model():
    """A linear layer behind a reshape to exactly one row: calibration cannot batch it."""
    import torch

    class OneRow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x.reshape(1, 3))

    return OneRow().eval()


def test_executorch_calibration_of_a_fixed_batch_model_falls_back_row_by_row_logged_and_recorded(tmp_path, caplog):
    pytest.importorskip("executorch")
    import torch

    from leanserve.artifact import Signature, TensorSpec
    from leanserve.deploy.edge.executorch import STATIC_INT8, build

    signature = Signature((TensorSpec.parse("x:FP32:-1,3"),), (TensorSpec.parse("y:FP32:-1,2"),))
    calibration = {"x": np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)}
    with caplog.at_level("WARNING", logger="leanserve.deploy.edge.executorch"):
        program = build(_one_row_only_model(), (torch.zeros(1, 3),), signature, STATIC_INT8, tmp_path, calibration)
    assert "calibrating row by row" in caplog.text
    assert program.fallbacks and program.fallbacks[0].startswith("int8 calibration ran row by row (a dynamic batch")
    assert program.fallbacks[0] in program.notes and program.path.is_file()
