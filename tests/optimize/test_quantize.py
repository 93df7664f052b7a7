"""Quantization passes on the real digits CNN (exported by PyTorch, so its linear layers are Gemm nodes)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

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


def _embedding_model(path, rows=4096, width=256):
    """tokens INT64 [-1, -1] -> Gather from a (rows x width) table (a vocabulary) and from a narrow rows x 8 one."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vocabulary = numpy_helper.from_array(rng.standard_normal((rows, width)).astype(np.float32) * 0.05, "vocabulary")
    small = numpy_helper.from_array(rng.standard_normal((rows, 8)).astype(np.float32), "small")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["vocabulary", "tokens"], ["v"], name="word"),
         helper.make_node("Gather", ["small", "tokens"], ["s"], name="small_gather")],
        "embed", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "t", width]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", "t", 8])],
        initializer=[vocabulary, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_int4_embeddings_store_vocabulary_rows_in_4_bits_that_the_ort_format_holds(tmp_path):
    from leanserve.deploy.edge.ort_format import convert_to_ort
    from leanserve.optimize.quantize import has_large_embedding, int4_embeddings

    src = _embedding_model(tmp_path / "embed.onnx")
    assert has_large_embedding(src)
    result = int4_embeddings(src, tmp_path / "int4.onnx", PassContext(read_model(src).signature))
    assert "vocabulary [4096, 256]" in result.notes[0] and "small" not in result.notes[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert ops == ["GatherBlockQuantized", "Gather"]
    # 4 bits a value plus one fp32 scale per 32 values: 0.625 bytes against 4 (the narrow table stays fp32)
    narrow = 4096 * 8 * 4
    assert (tmp_path / "int4.onnx").stat().st_size - narrow < 0.17 * (src.stat().st_size - narrow)
    tokens = {"tokens": np.array([[0, 5, 4095], [7, 7, 1]], np.int64)}
    before = ort.InferenceSession(str(src)).run(None, tokens)
    ort_file, _ = convert_to_ort(tmp_path / "int4.onnx", tmp_path / "ort")
    after = ort.InferenceSession(str(ort_file)).run(None, tokens)
    step = np.abs(before[0]).max() / 7  # the largest block scale
    assert np.abs(after[0] - before[0]).max() <= step / 2 + 1e-6
    np.testing.assert_array_equal(after[1], before[1])  # the small table is untouched


def test_int4_embeddings_leave_a_model_without_a_large_table_unchanged(digits_cnn_onnx, tmp_path):
    from leanserve.optimize.quantize import has_large_embedding, int4_embeddings

    assert not has_large_embedding(digits_cnn_onnx)
    result = int4_embeddings(digits_cnn_onnx, tmp_path / "same.onnx", PassContext(read_model(digits_cnn_onnx).signature))
    assert "unchanged" in result.notes[0]
    assert [n.op_type for n in onnx.load(str(tmp_path / "same.onnx")).graph.node] == \
        [n.op_type for n in onnx.load(str(digits_cnn_onnx)).graph.node]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_calibrates_on_a_row_count_that_is_not_a_multiple_of_the_batch(digits_cnn_onnx, digits, tmp_path, method):
    # 29 rows = one batch of 16 and a ragged 13 before the fix; the histogram calibrators failed on it
    from leanserve.optimize.quantize import static_int8

    _, x_test, _, _ = digits
    ctx = PassContext(read_model(digits_cnn_onnx).signature, {"image": x_test[:29]})
    result = static_int8(digits_cnn_onnx, tmp_path / "int8.onnx", ctx, method=method)
    assert any("29 rows (batches of 1)" in note for note in result.notes)
    after = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"image": x_test[:64]})[0]
    before = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x_test[:64]})[0]
    assert np.mean(before.argmax(1) == after.argmax(1)) > 0.9


def test_calibration_batches_all_have_the_same_size_and_use_every_row():
    from leanserve.optimize.quantize import calibration_batch_size

    assert [calibration_batch_size(rows, 16) for rows in (13, 29, 32, 36, 200, 1)] == [13, 1, 16, 12, 10, 1]


def test_fp16_model_passes_the_onnx_checker_and_can_be_registered(digits_cnn_onnx, digits, tmp_path):
    from leanserve import Repository
    from leanserve.optimize.quantize import to_fp16

    _, x_test, _, _ = digits
    to_fp16(digits_cnn_onnx, tmp_path / "fp16.onnx", PassContext(read_model(digits_cnn_onnx).signature))
    onnx.checker.check_model(onnx.load(str(tmp_path / "fp16.onnx")), full_check=True)
    Repository(tmp_path / "repo").add(tmp_path / "fp16.onnx", "half")
    before = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x_test[:64]})[0]
    after = ort.InferenceSession(str(tmp_path / "fp16.onnx")).run(None, {"image": x_test[:64]})[0]
    assert np.mean(before.argmax(1) == after.argmax(1)) > 0.95


@pytest.mark.parametrize("seven_bit", [True, False])
def test_static_int8_weights_use_7_bits_only_where_asked(digits_cnn_onnx, digits, tmp_path, seven_bit):
    # 7-bit weights keep ONNX Runtime's u8 x s8 products from saturating on CPUs without VNNI
    from onnx import numpy_helper

    from leanserve.optimize.quantize import static_int8

    _, x_test, _, _ = digits
    ctx = PassContext(read_model(digits_cnn_onnx).signature, {"image": x_test[:32]})
    result = static_int8(digits_cnn_onnx, tmp_path / "int8.onnx", ctx, seven_bit_weights=seven_bit)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 16]
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest <= 64 if seven_bit else largest == 127
    assert any("7-bit weights" in note for note in result.notes) is seven_bit
