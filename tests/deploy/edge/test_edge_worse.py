"""`leanserve edge` refuses an artifact whose held-out quality drops by more than the budget, in one line on
stderr naming both figures; with --force it registers it and warns."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from leanserve import Repository
from leanserve.cli import main


@pytest.fixture
def projection(tmp_path):
    """y = x W (16 -> 8), evaluation rows drawn at random, and held-out rows almost in W's left null space:
    the float outputs are tiny, so the int8/int4 weights' rounding error dominates them (cosine far below 1)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "projection",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "projection.onnx"))
    repo = Repository(tmp_path / "repo")
    repo.add(tmp_path / "projection.onnx", "proj")
    u = np.linalg.svd(w.astype(np.float64))[0]
    held = rng.normal(size=(40, 8)) @ u[:, 8:].T + 0.01 * rng.normal(size=(40, 8)) @ u[:, :8].T
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(40, 16)).astype(np.float32))
    np.savez(tmp_path / "held.npz", x=held.astype(np.float32))
    args = ["edge", "proj:1", "--eval", str(tmp_path / "eval.npz"), "--holdout", str(tmp_path / "held.npz"),
            "--profile", "tiny", "--seconds", "0.1", "--repo", str(repo.root)]
    return repo, args


def test_edge_refuses_an_artifact_worse_than_the_budget_on_held_out_rows(projection, capsys):
    repo, args = projection
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ort artifact of proj:1 is worse than its parent: held-out cosine")
    assert "against 1.0000 for the parent" in err[0] and "budget 0.0100" in err[0] and "--force registers it anyway" in err[0]
    assert repo.versions("proj") == [1]


def test_edge_force_registers_the_worse_artifact_and_warns(projection, caplog):
    repo, args = projection
    assert main([*args, "--force"]) == 0
    assert "registered anyway (--force)" in caplog.text  # a WARNING line on stderr in a real run
    assert repo.versions("proj") == [1, 2]
    assert "is worse than its parent" in repo.get("proj", 2).manifest.metrics["registered_with_force"]
