"""TensorRT and CUDA through ONNX Runtime, tested without a GPU: provider settings, the engine cache kept
beside the version, int8 calibration tables, and the fallback when a GPU provider cannot start."""

import logging

import numpy as np
import pytest

from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError, UnsupportedFormat
from leanserve.optimize.quantize import TRT_CALIBRATION_TABLE, write_trt_calibration
from leanserve.optimize.steps import PassContext
from leanserve.runtime import load_session
from leanserve.runtime import onnxruntime as ort_engine

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def trt_settings(chosen):
    return next(settings for provider, settings in (c for c in chosen if isinstance(c, tuple))
                if provider == "TensorrtExecutionProvider")


def test_tensorrt_keeps_its_engine_cache_beside_the_version(affine_repo):
    artifact = affine_repo.get("affine")
    chosen = ort_engine.provider_options(GPU, RuntimeOptions(), artifact)
    settings = trt_settings(chosen)
    cache = artifact.path.parent / ".engine-cache" / artifact.path.name
    assert settings["trt_engine_cache_enable"] == "True" and settings["trt_engine_cache_path"] == str(cache)
    assert "trt_fp16_enable" not in settings and chosen[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt_settings(ort_engine.provider_options(GPU, RuntimeOptions(precision="fp16"), artifact))["trt_fp16_enable"] == "True"


def test_tensorrt_int8_needs_a_calibration_table_or_a_qdq_model(affine_repo):
    with pytest.raises(UnsupportedFormat, match="calibration table"):
        ort_engine.provider_options(GPU, RuntimeOptions(precision="int8"), affine_repo.get("affine"))
    assert ort_engine.provider_options(["CPUExecutionProvider"], RuntimeOptions(precision="int8"),
                                       affine_repo.get("affine")) == ["CPUExecutionProvider"]  # CPU ignores it


def test_a_calibration_table_written_on_the_cpu_is_used_for_tensorrt_int8(tmp_path, affine_onnx):
    from leanserve import Repository
    from leanserve.formats import read_model

    data = {"x": np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)}
    files = write_trt_calibration(affine_onnx, tmp_path / "table", PassContext(read_model(affine_onnx).signature, data))
    assert files[0].name == TRT_CALIBRATION_TABLE and files[0].stat().st_size > 0
    repo = Repository(tmp_path / "repo")
    ref = repo.add(affine_onnx, "affine", attachments=files)
    artifact = repo.get("affine", ref.version)
    settings = trt_settings(ort_engine.provider_options(GPU, RuntimeOptions(precision="int8"), artifact))
    assert settings["trt_int8_enable"] == "True" and settings["trt_int8_calibration_table_name"] == TRT_CALIBRATION_TABLE
    assert (ort_engine.engine_cache_dir(artifact) / TRT_CALIBRATION_TABLE).read_bytes() == files[0].read_bytes()


@pytest.fixture
def gpu_machine_without_working_gpu(monkeypatch):
    """ONNX Runtime reports GPU providers, but creating a session with one fails (no driver here)."""
    real = ort_engine.ort.InferenceSession
    tried = []

    def session(path, options, providers):
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        tried.append(first)
        if first != "CPUExecutionProvider":
            raise RuntimeError(f"{first}: libcudart.so.12: cannot open shared object file")
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort_engine.ort, "get_available_providers", lambda: list(GPU))
    monkeypatch.setattr(ort_engine.ort, "InferenceSession", session)
    return tried


def test_gpu_providers_that_cannot_start_fall_back_to_the_cpu_with_the_reason_logged(
        affine_repo, gpu_machine_without_working_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="leanserve.runtime.onnxruntime"):
        session = load_session(affine_repo.get("affine"))
    assert gpu_machine_without_working_gpu == GPU
    out = session.run({"x": np.ones((1, 4), np.float32)})
    assert np.allclose(out["y"], 3.0)
    assert "TensorrtExecutionProvider cannot run" in caplog.text and "falling back to CUDAExecutionProvider" in caplog.text
    assert "libcudart" in caplog.text


def test_a_gpu_provider_asked_for_by_name_does_not_fall_back(affine_repo, gpu_machine_without_working_gpu):
    with pytest.raises(ModelLoadError, match="libcudart"):
        load_session(affine_repo.get("affine"), RuntimeOptions(providers=("CUDAExecutionProvider",)))


def test_a_gpu_provider_absent_from_this_build_is_refused_by_name(affine_repo, monkeypatch):
    # a CPU-only build, faked, so the test holds on an onnxruntime-gpu install too
    monkeypatch.setattr(ort_engine.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UnsupportedFormat, match="TensorrtExecutionProvider is not available here; available: .*CPU"):
        load_session(affine_repo.get("affine"), RuntimeOptions(providers=("TensorrtExecutionProvider",)))


def test_bf16_is_an_engine_precision_for_tensorrt(affine_repo):
    settings = trt_settings(ort_engine.provider_options(GPU, RuntimeOptions(precision="bf16"), affine_repo.get("affine")))
    assert settings["trt_bf16_enable"] == "True" and "trt_fp16_enable" not in settings


def test_gpu_check_prints_skip_for_every_path_where_the_providers_are_absent():
    import subprocess
    import sys
    from pathlib import Path

    import onnxruntime

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()):
        pytest.skip("a GPU build of ONNX Runtime is installed: run benchmarks/gpu_check.py itself")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--no-record"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("cuda", "tensorrt"))]
    assert len(verdicts) == 6 and all(" SKIP: provider absent: " in line for line in verdicts)
