import numpy as np
import pytest

from conftest import affine_inputs, make_string_model
from leanserve import RuntimeOptions, load
from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.runtime import load_session
from leanserve.runtime.onnxruntime import choose_providers


def test_loaded_model_predicts_named_outputs(affine_repo):
    model = load("affine", repo=affine_repo.root)
    out = model.predict(affine_inputs())
    np.testing.assert_allclose(out["y"], affine_inputs()["x"] * 2 + 1)
    assert list(model.predict(affine_inputs(), ["s"])) == ["s"]


def test_predict_validates_before_the_engine_sees_inputs(affine_repo):
    model = load("affine", repo=affine_repo.root)
    with pytest.raises(InvalidInput, match="input 'x': expected datatype FP32, got INT64"):
        model.predict({"x": np.zeros((1, 4), np.int64)})
    with pytest.raises(InvalidInput, match="unknown output 'z'"):
        model.predict(affine_inputs(), ["z"])


def test_providers_prefer_gpu_when_present_and_refuse_missing_ones():
    assert choose_providers((), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers((), gpu) == gpu
    with pytest.raises(UnsupportedFormat, match="CUDAExecutionProvider is not available"):
        choose_providers(("CUDAExecutionProvider",), ["CPUExecutionProvider"])


def test_thread_settings_reach_the_session(affine_repo):
    session = load_session(affine_repo.get("affine"), RuntimeOptions(intra_op_threads=1, inter_op_threads=1))
    assert session.providers == ["CPUExecutionProvider"]
    assert session.run(affine_inputs(1))["s"].shape == (1, 1)


def test_unknown_engine_is_refused(affine_repo):
    with pytest.raises(UnsupportedFormat, match="unknown engine 'tensorflow'"):
        load_session(affine_repo.get("affine"), RuntimeOptions(engine="tensorflow"))


def test_string_tensors_round_trip_as_bytes(repo, tmp_path):
    repo.add(make_string_model(tmp_path / "s.onnx"), "strings")
    model = load("strings", repo=repo)
    text = np.array([b"hello", "h\u00e9llo".encode()], dtype=object)
    assert model.predict({"text": text})["echo"].tolist() == [b"hello", "h\u00e9llo".encode()]
