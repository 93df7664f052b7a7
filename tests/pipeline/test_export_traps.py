"""The two export traps of issue 19: --dynamic-axis keeps the batch axis; a failing recipe is a skip."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from leanserve.artifact import Signature, TensorSpec  # noqa: E402
from leanserve.formats import read_model  # noqa: E402
from leanserve.from_torch import export  # noqa: E402


class _Summer(torch.nn.Module):
    def forward(self, tokens):
        return tokens.float().sum(dim=1, keepdim=True)


def test_a_given_dynamic_axis_adds_to_the_batch_axis(tmp_path):
    path = tmp_path / "m.onnx"
    export(_Summer(), torch.ones(2, 5, dtype=torch.int64), path, input_names=["tokens"],
           dynamic_axes={"tokens": [1]}, exporter="torchscript")
    assert read_model(path).signature.input("tokens").shape == (-1, -1)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path)).run(None, {"tokens": np.ones((3, 7), np.int64)})[0]
    assert out.shape == (3, 1) and out[0, 0] == 7


def test_an_empty_mapping_still_means_static(tmp_path):
    path = tmp_path / "m.onnx"
    export(_Summer(), torch.ones(2, 5, dtype=torch.int64), path, input_names=["tokens"], dynamic_axes={},
           exporter="torchscript")
    assert read_model(path).signature.input("tokens").shape == (2, 5)


def test_a_recipe_that_raises_anything_is_a_logged_skip(tmp_path, caplog, monkeypatch):
    from leanserve.optimize import search as search_module
    from leanserve.optimize.recipe import Recipe

    def fusion_asserts(*args, **kwargs):
        raise AssertionError("0 heads, 384 hidden")

    monkeypatch.setattr(search_module, "apply_recipe", fusion_asserts)
    signature = Signature((TensorSpec("x", "FP32", (-1, 2)),), (TensorSpec("y", "FP32", (-1, 1)),))
    searcher = search_module.Searcher(tmp_path / "m.onnx", signature, {}, None, "mse",
                                      search_module.parse_budget("1%"), tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="leanserve.optimize.search"):
        candidate = searcher.try_recipe(Recipe("bert fusion"), baseline=None)
    assert candidate.error == "AssertionError: 0 heads, 384 hidden"
    assert "recipe bert fusion skipped: AssertionError: 0 heads, 384 hidden" in caplog.text
