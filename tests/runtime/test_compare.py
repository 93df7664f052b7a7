"""``leanserve bench``: engines compared on one version, outputs checked against ONNX Runtime."""

import numpy as np
import pytest

from leanserve.cli import main
from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.runtime.compare import compare_engines, format_table, synthetic_inputs


def test_synthetic_inputs_follow_the_signature(affine_repo):
    arrays = synthetic_inputs(affine_repo.get("affine").signature, rows=8)
    assert arrays["x"].shape == (8, 4) and arrays["x"].dtype == np.float32 and arrays["x"].std() > 0


def test_engines_are_measured_and_a_disagreeing_engine_is_flagged(affine_repo, noisy_engine):
    results = compare_engines(affine_repo.get("affine"), ["onnxruntime", noisy_engine], batch_size=8, speed_time_s=0.05)
    ort, noisy = results
    assert ort.error is None and ort.speed.latency_p50_ms > 0 and ort.mismatch is None and ort.load_s >= 0
    assert noisy.speed is not None and "largest difference" in noisy.mismatch
    table = format_table(results, 8)
    assert "reference" in table and "MISMATCH" in table and "x1.00" in table


def test_onnx_runtime_is_the_reference_even_when_not_listed(affine_repo, noisy_engine):
    (noisy,) = compare_engines(affine_repo.get("affine"), [noisy_engine], batch_size=4, speed_time_s=0.05)
    assert noisy.engine == "noisy" and noisy.mismatch is not None


def test_an_engine_that_cannot_load_is_a_row_not_a_crash(affine_repo, monkeypatch):
    from leanserve.runtime import ENGINES

    monkeypatch.setitem(ENGINES, "absent", ("leanserve_no_such_module", "absent"))
    _, absent = compare_engines(affine_repo.get("affine"), ["onnxruntime", "absent"], batch_size=4, speed_time_s=0.05)
    assert absent.speed is None and "leanserve[absent]" in absent.error
    assert "failed" in format_table([absent], 4)


def test_data_missing_an_input_is_refused_by_name(affine_repo):
    with pytest.raises(InvalidInput, match="no array for input 'x'"):
        compare_engines(affine_repo.get("affine"), ["onnxruntime"], {"y": np.zeros((4, 4), np.float32)})


def test_bench_command_prints_the_table_and_fails_on_a_mismatch(capsys, affine_repo, noisy_engine, tmp_path):
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    argv = ["bench", "affine", "--repo", str(affine_repo.root), "--data", str(tmp_path / "data.npz"), "--seconds", "0.05",
            "--batch-size", "16"]
    assert main(argv + ["--engines", "ort"]) == 0
    out = capsys.readouterr().out
    assert "given data" in out and "rows/s (b=16)" in out and "onnxruntime" in out
    assert main(argv + ["--engines", f"ort,{noisy_engine}"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_bench_refuses_non_onnx_versions(tmp_path, monkeypatch):
    from leanserve.artifact import Manifest, ModelArtifact, Signature

    artifact = ModelArtifact(tmp_path, Manifest("openvino", "m.xml", Signature((), ()), {}))
    with pytest.raises(UnsupportedFormat, match="ONNX versions"):
        compare_engines(artifact, ["onnxruntime"])
