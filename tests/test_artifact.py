import numpy as np
import pytest

from leanserve.artifact import Manifest, ModelArtifact, Signature, TensorSpec
from leanserve.errors import CorruptArtifact, InvalidInput

SIG = Signature((TensorSpec("x", "FP32", (-1, 3)), TensorSpec("ids", "INT64", (-1, -1))), (TensorSpec("y", "FP32", (-1, 1)),))


def test_tensor_spec_parses_cli_form():
    assert TensorSpec.parse("x:fp32:-1,1,28,28") == TensorSpec("x", "FP32", (-1, 1, 28, 28))
    assert TensorSpec.parse("scalar:INT64:") == TensorSpec("scalar", "INT64", ())


@pytest.mark.parametrize("text", ["x:FP32", "x:FLOAT:1,2", "x:FP32:a,b", ":FP32:1", "x:FP32:-2"])
def test_tensor_spec_rejects_malformed_text(text):
    with pytest.raises(InvalidInput):
        TensorSpec.parse(text)


def test_signature_accepts_matching_inputs():
    SIG.validate_inputs({"x": np.zeros((2, 3), np.float32), "ids": np.zeros((2, 7), np.int64)})


@pytest.mark.parametrize("inputs, message", [
    ({"x": np.zeros((2, 3), np.float32)}, "missing input 'ids'"),
    ({"x": np.zeros((2, 3), np.float32), "ids": np.zeros((2, 1), np.int64), "z": np.zeros(1)}, "unexpected input 'z'"),
    ({"x": np.zeros((2, 3), np.float64), "ids": np.zeros((2, 1), np.int64)}, "input 'x': expected datatype FP32, got FP64"),
    ({"x": np.zeros((2, 4), np.float32), "ids": np.zeros((2, 1), np.int64)}, "input 'x': dimension 1 must be 3, got 4"),
    ({"x": np.zeros((3,), np.float32), "ids": np.zeros((2, 1), np.int64)}, "input 'x': expected shape [-1,3] (rank 2), got [3] (rank 1)"),
])
def test_signature_errors_name_tensor_expected_and_received(inputs, message):
    with pytest.raises(InvalidInput) as err:
        SIG.validate_inputs(inputs)
    assert message in str(err.value)


def test_signature_rejects_nan_only_when_told():
    inputs = {"x": np.array([[np.nan, 0, 0]], np.float32), "ids": np.zeros((1, 1), np.int64)}
    SIG.validate_inputs(inputs)
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        SIG.validate_inputs(inputs, allow_nonfinite=False)


def test_signature_rejects_unknown_output_request():
    with pytest.raises(InvalidInput, match="unknown output 'nope'"):
        SIG.check_outputs(["nope"])


def test_manifest_round_trips_through_json():
    manifest = Manifest("onnx", "m.onnx", SIG, {"m.onnx": "ab" * 32}, metrics={"size_bytes": 10})
    again = Manifest.from_json(manifest.to_json())
    assert again.signature == SIG and again.files == manifest.files and again.default_runtime == "onnxruntime"


def test_unreadable_manifest_is_reported_as_corrupt(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptArtifact, match="unreadable manifest"):
        ModelArtifact.open(tmp_path)


def test_folder_without_manifest_is_not_a_version(tmp_path):
    with pytest.raises(CorruptArtifact, match="no manifest.json"):
        ModelArtifact.open(tmp_path)
