"""How many engine threads a version gets when its settings leave it to the server."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import _save
from leanserve.config import ModelConfig
from leanserve.repository import VersionRef
from leanserve.serve import loading as loading_module
from leanserve.serve.loading import HEAVY_MODEL_BYTES
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.registry import ModelRegistry


def make_wide_model(path, width: int) -> None:
    """x FP32 [-1, width] @ W: ``width``^2 float weights."""
    w = onnx.numpy_helper.from_array(np.full((width, width), 0.001, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], initializer=[w])
    _save(graph, path)


def test_a_heavy_model_gets_every_core_and_a_light_one_leaves_the_event_loop_one(repo, affine_onnx, tmp_path, monkeypatch):
    wide = tmp_path / "wide.onnx"
    make_wide_model(wide, width=int((HEAVY_MODEL_BYTES / 4) ** 0.5) + 8)
    repo.add(affine_onnx, "light")
    repo.add(wide, "heavy")
    threads: dict[str, int] = {}
    real = loading_module.load_session

    def recording(artifact, options=None):
        threads[artifact.path.parent.name] = options.intra_op_threads  # the model folder: repo/NAME/VERSION
        return real(artifact, options)

    monkeypatch.setattr(loading_module, "load_session", recording)
    registry = ModelRegistry(repo, ServerMetrics())
    for name in ("light", "heavy"):
        _, sessions, _ = registry._load_blocking(VersionRef(name, 1), ModelConfig())
        for session in sessions:
            session.close()
    cores = len(os.sched_getaffinity(0))
    assert threads == {"light": max(1, cores - 1), "heavy": cores}
