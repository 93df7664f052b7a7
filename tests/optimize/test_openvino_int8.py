"""NNCF post-training int8 (the openvino_int8 pass) on the real digits CNN, run by the OpenVINO engine."""

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from leanserve import RuntimeOptions  # noqa: E402
from leanserve.artifact import Manifest, ModelArtifact  # noqa: E402
from leanserve.errors import InvalidInput  # noqa: E402
from leanserve.formats import read_model  # noqa: E402
from leanserve.optimize.openvino import nncf_int8  # noqa: E402
from leanserve.optimize.quantize import quantizable_nodes  # noqa: E402
from leanserve.optimize.recipe import apply_recipe, parse_recipe  # noqa: E402
from leanserve.optimize.steps import PassContext  # noqa: E402
from leanserve.runtime import load_session  # noqa: E402

OPENVINO = RuntimeOptions(engine="openvino", intra_op_threads=2)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, digits, digits_teacher) -> Path:
    import torch

    from leanserve.from_torch import export

    path = tmp_path_factory.mktemp("ov_int8") / "cnn.onnx"
    export(digits_teacher, torch.from_numpy(digits[1][:2]), path, input_names=["image"], output_names=["logits"])
    return path


@pytest.fixture(scope="module")
def ctx(cnn, digits) -> PassContext:
    return PassContext(read_model(cnn).signature, {"image": digits[0][:300]})


def _top1(path: Path, digits) -> float:
    artifact = ModelArtifact(path.parent, Manifest("onnx", path.name, read_model(path).signature, {}))
    _, x_test, _, y_test = digits
    logits = load_session(artifact, OPENVINO).run({"image": x_test})["logits"]
    return float(np.mean(logits.argmax(axis=1) == y_test))


def _float_nodes(path: Path) -> set[str]:
    """Conv/MatMul/Gemm nodes none of whose inputs come from a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and not set(n.input) & dequantized}


def test_openvino_int8_recipe_keeps_top1_within_half_a_point(cnn, ctx, digits, tmp_path):
    dst = tmp_path / "int8.onnx"
    notes = apply_recipe(parse_recipe("openvino_int8"), cnn, dst, ctx)
    assert _float_nodes(dst) == set()
    assert any(n == f"int8: {len(quantizable_nodes(cnn))} of {len(quantizable_nodes(cnn))} Conv/MatMul/Gemm nodes" for n in notes)
    fp32, int8 = _top1(cnn, digits), _top1(dst, digits)
    assert fp32 > 0.9
    assert fp32 - int8 <= 0.005, f"fp32 {fp32:.4f}, NNCF int8 {int8:.4f}"


def test_excluded_node_stays_float_and_the_rest_is_int8(cnn, ctx, tmp_path):
    first = quantizable_nodes(cnn)[0]
    result = nncf_int8(cnn, tmp_path / "int8.onnx", PassContext(ctx.signature, ctx.calibration, (first,)), subset_size=64)
    assert _float_nodes(tmp_path / "int8.onnx") == {first}
    assert f"kept in float: {first} (excluded on request)" in result.notes
    assert result.notes[0] == "NNCF int8 QDQ (performance preset) calibrated on 64 rows"


def test_calibration_data_is_required(cnn, ctx, tmp_path):
    with pytest.raises(InvalidInput, match="needs calibration data"):
        nncf_int8(cnn, tmp_path / "int8.onnx", PassContext(ctx.signature))
    with pytest.raises(InvalidInput, match="no array for input 'image'"):
        nncf_int8(cnn, tmp_path / "int8.onnx", PassContext(ctx.signature, {"pixels": ctx.calibration["image"]}))
    with pytest.raises(InvalidInput, match="preset must be one of performance, mixed"):
        nncf_int8(cnn, tmp_path / "int8.onnx", ctx, preset="fast")
