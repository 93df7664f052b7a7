import numpy as np
import onnxruntime as ort
import pytest
import torch

from leanserve import export
from leanserve.errors import ExportError, InvalidInput
from leanserve.formats import read_model


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, features, scale):
        hidden = self.linear(features)
        return hidden * scale, hidden.sum(dim=1, keepdim=True)


def test_export_writes_onnx_with_signature_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    module = TwoHeads()
    result = export(module, (torch.randn(2, 4), torch.ones(2, 1)), tmp_path / "m.onnx", output_names=["scaled", "total"])
    assert result.exporter == "dynamo"
    assert result.max_abs_diff < 1e-5
    signature = read_model(result.path).signature
    assert [s.name for s in signature.inputs] == ["features", "scale"]
    assert signature.inputs[0].shape == (-1, 4) and signature.outputs[0].name == "scaled"
    session = ort.InferenceSession(str(result.path))
    x = np.random.rand(5, 4).astype(np.float32)
    got = session.run(["scaled"], {"features": x, "scale": np.ones((5, 1), np.float32)})[0]
    want = module(torch.from_numpy(x), torch.ones(5, 1))[0].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_refuses_when_onnx_differs_beyond_tolerance(tmp_path):
    module = TwoHeads()
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch by up to"):
        export(module, (torch.randn(2, 4) * 1e6, torch.ones(2, 1)), path, tolerance=0.0)
    assert not path.exists()
    forced = export(module, (torch.randn(2, 4) * 1e6, torch.ones(2, 1)), path, tolerance=0.0, force=True)
    assert forced.path.exists()


def test_export_falls_back_to_torchscript_exporter_when_dynamo_fails(tmp_path, monkeypatch):
    import leanserve.from_torch as from_torch

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(from_torch, "_export_dynamo", broken)
    result = export(TwoHeads(), (torch.randn(2, 4), torch.ones(2, 1)), tmp_path / "m.onnx")
    assert result.exporter == "torchscript"
    assert read_model(result.path).signature.inputs[0].shape == (-1, 4)


def test_export_validates_its_arguments(tmp_path):
    with pytest.raises(InvalidInput, match="example_inputs"):
        export(TwoHeads(), [1, 2], tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match="dynamic_axes names unknown input 'nope'"):
        export(TwoHeads(), (torch.randn(2, 4), torch.ones(2, 1)), tmp_path / "m.onnx", dynamic_axes={"nope": [0]})
