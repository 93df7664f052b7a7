"""The leanserve command, driven in-process through main() (and once as a real subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from leanserve.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "leanserve.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("import", "export", "list", "inspect", "rm", "config", "predict", "demo", "serve", "traffic", "rollback"):
        assert command in result.stdout


def test_import_list_inspect_rm(capsys, tmp_path, affine_onnx):
    repo = tmp_path / "repo"
    code, out, _ = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    assert code == 0 and "imported" in out and "affine:1" in out and "x FP32 [-1, 4]" in out
    run(capsys, "import", affine_onnx, "--name", "affine", "--repo", repo)
    code, out, _ = run(capsys, "list", "--repo", repo)
    assert code == 0 and "affine" in out and "1,2" in out
    code, out, _ = run(capsys, "inspect", "affine:1", "--repo", repo, "--json")
    info = json.loads(out)
    assert info["version"] == 1 and info["checksums"] == "verified" and info["format"] == "onnx"
    code, out, _ = run(capsys, "inspect", "affine", "--repo", repo)
    assert "affine:1" in out and "[verified]" in out  # the served version: the second import is only registered
    code, out, _ = run(capsys, "rm", "affine:1", "--repo", repo)
    assert code == 0 and "removed affine:1" in out
    assert "1,2" not in run(capsys, "list", "--repo", repo)[1]


def test_repo_defaults_to_environment_variable(capsys, tmp_path, affine_onnx, monkeypatch):
    monkeypatch.setenv("LEANSERVE_REPO", str(tmp_path / "env-repo"))
    from leanserve.cli import build_parser

    args = build_parser().parse_args(["list"])
    assert args.repo == str(tmp_path / "env-repo")


@pytest.mark.parametrize("argv, message", [
    (["inspect", "nope"], "no model named 'nope'"),
    (["inspect", "affine:9"], "has no version 9"),
    (["rm", "affine"], "say which version"),
    (["import", "missing.onnx", "--name", "m"], "no such model file"),
    (["import", "{onnx}", "--name", "../up"], "invalid model name"),
    (["config", "affine", "--set", "batching.max_batch_size=0"], "batching.max_batch_size: expected an integer >= 1"),
    (["config", "affine", "--set", "nonsense=1"], "unknown setting 'nonsense'"),
])
def test_user_errors_are_one_line_with_nonzero_exit(capsys, affine_repo, affine_onnx, argv, message):
    argv = [a.replace("{onnx}", str(affine_onnx)) for a in argv]
    code, out, err = run(capsys, *argv, "--repo", affine_repo.root)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert affine_repo.versions("affine") == [1]


def test_corrupt_file_import_is_one_error_line(capsys, tmp_path, affine_repo):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    code, _, err = run(capsys, "import", bad, "--name", "affine", "--repo", affine_repo.root)
    assert code == 1 and "error:" in err and "Traceback" not in err
    assert affine_repo.versions("affine") == [1]


def test_config_set_changes_settings(capsys, affine_repo):
    code, out, _ = run(capsys, "config", "affine", "--set", "version_policy.kind=\"all\"", "--set", "batching.max_batch_size=8",
                       "--repo", affine_repo.root)
    assert code == 0 and json.loads(out)["batching"]["max_batch_size"] == 8
    assert affine_repo.config("affine").version_policy.kind == "all"


def test_predict_from_npy_npz_and_json(capsys, tmp_path, affine_repo):
    x = np.ones((2, 4), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "x.json").write_text(json.dumps({"x": x.tolist()}))
    (tmp_path / "v2.json").write_text(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1] * 8}]}))
    for name in ("x.npy", "x.npz", "x.json", "v2.json"):
        code, out, err = run(capsys, "predict", "affine", "--input", tmp_path / name, "--repo", affine_repo.root)
        assert code == 0, err
        assert json.loads(out)["y"]["data"] == [[3.0] * 4] * 2
    code, out, _ = run(capsys, "predict", "affine", "--input", tmp_path / "x.npz", "--output", tmp_path / "out.npz",
                       "--repo", affine_repo.root)
    assert np.load(tmp_path / "out.npz")["s"].tolist() == [[4.0], [4.0]]


def test_predict_bad_inputs_are_clear(capsys, tmp_path, affine_repo):
    np.save(tmp_path / "wrong.npy", np.ones((2, 5), np.float32))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "extra.json").write_text(json.dumps({"x": [[1, 2, 3, 4]], "z": [1]}))
    cases = {"wrong.npy": "dimension 1 must be 4, got 5", "broken.json": "unreadable input file", "extra.json": "unexpected input 'z'"}
    for name, message in cases.items():
        code, _, err = run(capsys, "predict", "affine", "--input", tmp_path / name, "--repo", affine_repo.root)
        assert code == 1 and message in err, err


def test_export_command_exports_and_imports(capsys, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Linear(3, 2), torch.randn(2, 3)\n"
    )
    code, out, err = run(capsys, "export", f"{factory}:build", "--name", "linear", "--out", tmp_path / "linear.onnx",
                         "--repo", tmp_path / "repo")
    assert code == 0, err
    assert "dynamo exporter" in out and "imported as linear:1" in out


def test_demo_trains_exports_imports_and_reports_accuracy(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--repo", tmp_path / "repo", "--epochs", "3")
    assert code == 0, err
    accuracy = float(out.split("held-out accuracy: ")[1].split("%")[0])
    assert accuracy > 85.0
    assert "digits-cnn:1" in out
    # the files the README's first session names, beside the repository
    for name in ("request.npz", "eval.npz", "calib.npz", "my_model.onnx"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "images").glob("*.png"))) == 32
    assert set(np.load(tmp_path / "eval.npz")) == {"image", "labels"}


def test_demo_stores_a_reference_profile_for_drift(tmp_path, capsys):
    from leanserve import Repository
    from leanserve.monitor.reference import load_reference

    assert main(["demo", "--repo", str(tmp_path / "repo"), "--epochs", "1"]) == 0
    profile = load_reference(Repository(tmp_path / "repo"), "digits-cnn", 1)
    assert profile is not None and set(profile.names) >= {"image", "logits"}


def test_import_with_data_stores_a_reference_profile(capsys, tmp_path, affine_onnx):
    from leanserve import Repository
    from leanserve.monitor.reference import load_reference

    np.savez(tmp_path / "typical.npz", x=np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32))
    code, out, _ = run(capsys, "import", affine_onnx, "--name", "affine", "--repo", tmp_path / "repo",
                       "--data", tmp_path / "typical.npz")
    assert code == 0 and "reference profile" in out and "300 rows" in out
    profile = load_reference(Repository(tmp_path / "repo"), "affine", 1)
    assert profile is not None and "x" in profile.names

