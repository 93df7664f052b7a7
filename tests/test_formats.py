import zipfile

import pytest
import torch

from leanserve import Repository, TensorSpec, load
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat
from leanserve.formats import read_model


class Doubler(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"123")
    with pytest.raises(UnsupportedFormat, match="unknown model format '.bin'"):
        read_model(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(InvalidInput, match="no such model file"):
        read_model(tmp_path / "nope.onnx")


def test_torchscript_needs_a_signature_and_then_serves(tmp_path):
    path = tmp_path / "doubler.pt"
    torch.jit.script(Doubler()).save(str(path))
    with pytest.raises(InvalidInput, match="--input NAME:DATATYPE:SHAPE"):
        read_model(path)
    repo = Repository(tmp_path / "repo")
    ref = repo.add(path, "doubler", inputs=[TensorSpec.parse("x:FP32:-1,3")], outputs=[TensorSpec.parse("y:FP32:-1,3")])
    model = load(ref.name, repo=repo)
    assert model.session.engine == "torch"
    assert model.predict({"x": torch.ones(2, 3).numpy()})["y"].tolist() == [[2.0] * 3] * 2


def test_torch_export_program_signature_is_read_from_the_program(tmp_path):
    path = tmp_path / "doubler.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Doubler(), (torch.ones(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    source = read_model(path)
    assert source.format == "torch_export"
    assert source.signature.inputs[0] == TensorSpec("x", "FP32", (-1, 3))
    repo = Repository(tmp_path / "repo")
    model = load(repo.add(path, "doubler").name, repo=repo)
    assert model.predict({"x": torch.ones(4, 3).numpy()})["output_0"].shape == (4, 3)


def test_corrupt_torch_archives_are_refused(tmp_path):
    not_zip = tmp_path / "bad.pt"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a zip file"):
        read_model(not_zip, [TensorSpec.parse("x:FP32:-1")], [TensorSpec.parse("y:FP32:-1")])
    empty_zip = tmp_path / "empty.pt2"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("junk.txt", "x")
    with pytest.raises(ModelLoadError):
        read_model(empty_zip)


def test_signature_override_must_name_the_onnx_models_tensors(affine_onnx):
    with pytest.raises(InvalidInput, match="the model's inputs are \\['x'\\]"):
        read_model(affine_onnx, inputs=[TensorSpec.parse("wrong:FP32:-1,4")])


def test_openvino_model_without_the_extra_says_which_extra(tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"")
    try:
        import openvino  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedFormat, match=r"leanserve\[openvino\]"):
            read_model(xml)
    else:
        with pytest.raises(ModelLoadError):
            read_model(xml)
