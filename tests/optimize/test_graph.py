import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from leanserve.artifact import Signature, TensorSpec
from leanserve.optimize.graph import detect_attention_shape, fuse_transformer, optimize_graph
from leanserve.optimize.steps import PassContext

CTX = PassContext(Signature((TensorSpec("x", "FP32", (-1, 3, 8, 8)),), (TensorSpec("y", "FP32", (-1, 4, 8, 8)),)))


def conv_bn_model(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("w", (4, 3, 3, 3)), ("b", (4,)), ("scale", (4,)), ("bias", (4,)), ("mean", (4,))]]
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
         helper.make_node("Relu", ["n"], ["y"])],
        "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_basic_graph_optimization_folds_batchnorm_into_conv(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    result = optimize_graph(src, tmp_path / "o.onnx", CTX, level="basic")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops and result.notes
    x = np.random.rand(2, 3, 8, 8).astype(np.float32)
    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "o.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_transformer_fusion_on_a_non_transformer_says_so(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    result = fuse_transformer(src, tmp_path / "f.onnx", CTX)
    assert "nothing to fuse" in result.notes[0]


def test_attention_shape_is_read_from_weights_and_reshape_constants(tmp_path):
    hidden, head = 128, 32
    w = numpy_helper.from_array(np.zeros((hidden, hidden), np.float32), "wq")
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Shape", ["q"], ["s"]),
        helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Constant", [], ["hs"], value=numpy_helper.from_array(np.array([head], np.int64))),
        helper.make_node("Slice", ["s", "zero", "two"], ["bs"]),
        helper.make_node("Split", ["bs"], ["b", "sq"], num_outputs=2),
        helper.make_node("Concat", ["b", "sq", "minus1", "hs"], ["shape"], axis=0),
        helper.make_node("Reshape", ["q", "shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[w, numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                           numpy_helper.from_array(np.array([2], np.int64), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "att.onnx"))
    assert detect_attention_shape(tmp_path / "att.onnx") == (hidden // head, hidden)
    assert detect_attention_shape(conv_bn_model(tmp_path / "m.onnx")) == (0, 0)
