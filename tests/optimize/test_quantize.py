"""Quantization passes on the real digits CNN (exported by PyTorch, so its linear layers are Gemm nodes)."""

import numpy as np
import onnx
import onnxruntime as ort

from leanserve.formats import read_model
from leanserve.optimize.quantize import gemm_to_matmul, weight_only_int4
from leanserve.optimize.steps import PassContext


def test_int4_weights_reach_linear_layers_exported_as_gemm(digits_cnn_onnx, digits, tmp_path):
    _, x_test, _, _ = digits
    assert [n.op_type for n in onnx.load(str(digits_cnn_onnx)).graph.node].count("Gemm") == 2
    result = weight_only_int4(digits_cnn_onnx, tmp_path / "int4.onnx", PassContext(read_model(digits_cnn_onnx).signature))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gemm" not in ops
    assert any("2 Gemm(s)" in note for note in result.notes)
    assert (tmp_path / "int4.onnx").stat().st_size < 0.3 * digits_cnn_onnx.stat().st_size
    before = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x_test})[0]
    after = ort.InferenceSession(str(tmp_path / "int4.onnx")).run(None, {"image": x_test})[0]
    assert np.mean(before.argmax(1) == after.argmax(1)) > 0.95


def test_gemm_rewrite_is_exact_and_leaves_excluded_nodes_alone(digits_cnn_onnx, digits, tmp_path):
    _, x_test, _, _ = digits
    model = onnx.load(str(digits_cnn_onnx))
    first = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    assert gemm_to_matmul(model, exclude=[first]) == 1
    onnx.save(model, str(tmp_path / "mm.onnx"))
    assert [n.op_type for n in model.graph.node].count("Gemm") == 1
    before = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x_test})[0]
    after = ort.InferenceSession(str(tmp_path / "mm.onnx")).run(None, {"image": x_test})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_pre_processing_that_gives_up_leaves_nothing_in_the_working_directory(digits_cnn_onnx, tmp_path, monkeypatch):
    from leanserve.optimize import quantize

    def symbolic_inference_gives_up(src, dst, skip_symbolic_shape=False):
        # what ORT's symbolic shape inference does when it cannot finish: saves its partial model (with
        # the weights as an external-data file) into the working directory, then raises
        onnx.save_model(onnx.load(src), "sym_shape_infer_temp.onnx", save_as_external_data=True, size_threshold=0)
        if not skip_symbolic_shape:
            raise RuntimeError("Incomplete symbolic shape inference")
        onnx.save_model(onnx.load(src), dst)

    user_dir, work = tmp_path / "user", tmp_path / "work"
    user_dir.mkdir()
    work.mkdir()
    monkeypatch.chdir(user_dir)
    monkeypatch.setattr(quantize, "quant_pre_process", symbolic_inference_gives_up)
    out, note = quantize.pre_process(digits_cnn_onnx, work / "prepared.onnx")
    assert out == work / "prepared.onnx" and "symbolic shape inference failed" in note
    assert list(user_dir.iterdir()) == []
