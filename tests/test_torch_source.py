"""A version keeps its PyTorch source: TorchScript for learning and explanations, a torch.export program for
device compilers."""

import numpy as np
import pytest
import torch

from leanserve import Repository
from leanserve.cli import main
from leanserve.errors import UnsupportedFormat
from leanserve.torch_source import has_program, has_source, load_program, load_source


def test_demo_and_export_keep_a_trainable_source_that_matches_the_served_model(tmp_path, capsys):
    assert main(["demo", "--repo", str(tmp_path / "repo"), "--epochs", "1"]) == 0
    artifact = Repository(tmp_path / "repo").get("digits-cnn")
    assert has_source(artifact)
    module = load_source(artifact)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    from leanserve.runtime import load_session

    served = load_session(artifact).run({"image": x})["logits"]
    assert np.allclose(module(torch.from_numpy(x)).detach().numpy(), served, atol=1e-4)
    assert has_program(artifact)  # with a dynamic batch axis: three rows here, four when it was exported
    assert np.allclose(load_program(artifact).module()(torch.from_numpy(x)).detach().numpy(), served, atol=1e-4)
    module.train()
    loss = module(torch.from_numpy(x)).sum()
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_a_version_without_source_says_how_to_get_one(affine_repo):
    artifact = affine_repo.get("affine")
    assert not has_source(artifact)
    with pytest.raises(UnsupportedFormat, match="no PyTorch source.*leanserve export"):
        load_source(artifact)
    assert not has_program(artifact)
    with pytest.raises(UnsupportedFormat, match="no torch.export program.*leanserve export"):
        load_program(artifact)


class _FixedBatch(torch.nn.Module):
    """Reshapes to a batch of exactly 4: torch.export cannot give it a dynamic batch axis."""

    def forward(self, x):
        return x.reshape(4, -1).sum(1)


def test_a_module_with_a_fixed_batch_is_kept_with_fixed_shapes_and_the_fallback_is_logged_and_recorded(tmp_path, caplog):
    from leanserve.torch_source import program_export_info, save_program

    with caplog.at_level("WARNING", logger="leanserve.torch_source"):
        path = save_program(_FixedBatch(), torch.zeros(4, 3), tmp_path)
    assert "dynamic batch axis failed (Constraints violated (batch)" in caplog.text and "(batch 4)" in caplog.text
    info = program_export_info(path)
    assert info["batch_axis"] == "fixed (4)" and info["fallback"].startswith("dynamic batch export failed: Constraints")
    assert torch.export.load(str(path)).module()(torch.ones(4, 3)).tolist() == [3.0] * 4


def test_a_module_with_a_free_batch_axis_is_exported_dynamic_without_a_fallback(tmp_path, caplog):
    from leanserve.torch_source import program_export_info, save_program

    with caplog.at_level("WARNING", logger="leanserve.torch_source"):
        path = save_program(torch.nn.Linear(3, 2), torch.zeros(4, 3), tmp_path)
    assert program_export_info(path) == {"batch_axis": "dynamic", "fallback": None}
    assert "dynamic batch axis failed" not in caplog.text
