import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from leanserve.demo import accuracy, train_cnn
from leanserve.errors import InvalidInput
from leanserve.optimize.qat import FakeQuantLayer, export_qat, prepare_qat, qat_finetune, strip_qat


def test_prepare_wraps_every_conv_and_linear_and_strip_undoes_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    prepared = prepare_qat(model)
    assert sum(isinstance(m, FakeQuantLayer) for m in prepared.modules()) == 2
    assert not any(isinstance(m, FakeQuantLayer) for m in strip_qat(prepared).modules())
    assert not any(isinstance(m, FakeQuantLayer) for m in model.modules())  # the original is untouched
    with pytest.raises(InvalidInput, match="no Conv or Linear"):
        prepare_qat(torch.nn.ReLU())


def test_qat_finetune_then_qdq_export_keeps_accuracy(digits, tmp_path):
    x_train, x_test, y_train, y_test = digits
    model = train_cnn(x_train, y_train, epochs=4, progress=False)
    fp32 = accuracy(model(torch.from_numpy(x_test)).detach().numpy(), y_test)
    result = qat_finetune(model, x_train, y_train, epochs=1, progress=False)
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    exported = export_qat(result.module, torch.from_numpy(x_test[:2]), tmp_path / "qat.onnx",
                          input_names=["image"], output_names=["logits"])
    ops = [n.op_type for n in onnx.load(str(exported.path)).graph.node]
    assert ops.count("QuantizeLinear") >= 8  # input and weight of each of the 4 layers
    session = ort.InferenceSession(str(exported.path))
    int8 = accuracy(session.run(None, {"image": x_test})[0], y_test)
    assert int8 >= fp32 - 0.02
    float_export = export_qat(result.module, torch.from_numpy(x_test[:2]), tmp_path / "float.onnx", qdq=False)
    assert "QuantizeLinear" not in [n.op_type for n in onnx.load(str(float_export.path)).graph.node]


def test_qat_refuses_zero_epochs(digits):
    with pytest.raises(InvalidInput, match="epochs must be >= 1"):
        qat_finetune(torch.nn.Linear(2, 2), np.zeros((2, 2), np.float32), np.zeros(2, np.int64), epochs=0)
