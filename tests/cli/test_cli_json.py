"""--version, and --json on the reporting commands: one JSON document on stdout, nothing else there."""

import json
import subprocess
import sys

import numpy as np

from leanserve.cli import main


def run_json(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, json.loads(out)  # one document: json.loads refuses anything around it


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "leanserve.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"leanserve {version('leanserve')}"


def test_list_json_gives_each_version_with_its_state(capsys, affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "affine", serve=False)
    code, doc = run_json(capsys, "list", "--json", "--repo", affine_repo.root)
    assert code == 0 and doc["repo"] == str(affine_repo.root)
    versions = doc["models"][0]["versions"]
    assert doc["models"][0]["name"] == "affine"
    assert [(v["version"], v["state"], v["format"]) for v in versions] == [(1, "serving", "onnx"), (2, "registered", "onnx")]


def test_inspect_json_is_the_full_record(capsys, affine_repo):
    code, doc = run_json(capsys, "inspect", "affine", "--version", "1", "--json", "--repo", affine_repo.root)
    assert code == 0 and doc["version"] == 1 and doc["checksums"] == "verified" and "config" in doc


def test_bench_json_gives_each_engines_figures(capsys, affine_repo):
    code, doc = run_json(capsys, "bench", "affine:1", "--engines", "ort", "--seconds", "0.05", "--json",
                         "--repo", affine_repo.root)
    assert code == 0 and doc["ok"] is True and doc["data"] == "synthetic"
    (result,) = doc["results"]
    assert result["engine"] == "onnxruntime" and result["error"] is None and result["speed"]["latency_p50_ms"] > 0


def test_optimize_json_is_the_report_with_the_version_registered(capsys, affine_repo, tmp_path):
    np.savez(tmp_path / "eval.npz", x=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    code, doc = run_json(capsys, "optimize", "affine:1", "--eval", tmp_path / "eval.npz", "--recipe", "dynamic_int8",
                         "--max-accuracy-drop", "100%", "--time-budget", "60", "--dry-run", "--json",
                         "--report-dir", tmp_path / "report", "--repo", affine_repo.root)
    assert code == 0 and doc["metric"] == "cosine" and doc["registered"] is None
    assert [row["recipe"] for row in doc["candidates"]][1:] == ["dynamic_int8"]
    assert doc["holdout"] is not None  # chosen on selection rows, graded on held-out ones
    assert any(p.endswith("report.json") for p in doc["report_files"])


def test_help_says_each_default_once_and_never_none(capsys):
    import pytest

    for command in ("serve", "predict", "optimize", "learn", "k8s", "canary"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "default: 8000 (default" not in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "HTTP port (default: 8000)" in capsys.readouterr().out  # read from ServerConfig
