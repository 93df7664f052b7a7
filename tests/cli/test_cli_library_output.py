"""Library warnings stay quiet unless -v: real `leanserve` processes, their stderr read line by line.

Each command runs as a user runs it (a subprocess of its own, with none of the quieting variables a
previous in-process command may have left in this process's environment)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from leanserve.cli.verbosity import QUIET_ENV

# How the libraries leanserve drives print: ONNX Runtime's native log, torch's glog-style log, ExecuTorch's
# native log, Python warnings, and the logging module's lines of any logger but leanserve's.
LIBRARY_LINE = re.compile(r"\[[WE]:onnxruntime|^[WEI]\d{4} \d\d:\d\d|^\[\w+\.cpp:\d+\]|Warning:|"
                          r"^(WARNING|INFO|DEBUG) (?!leanserve)")


def leanserve(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    return subprocess.run([sys.executable, "-m", "leanserve.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def library_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if LIBRARY_LINE.search(line)]


@pytest.fixture
def unused_initializer_onnx(tmp_path: Path) -> Path:
    """y = relu(x), with an initializer no node uses: ONNX Runtime warns about it from C++ at load."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.ones(3, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "rows.npz", x=np.ones((2, 4), np.float32))
    return path


@pytest.fixture(scope="module")
def xnnpack_pte(tmp_path_factory) -> Path:
    """A two-layer MLP lowered to an ExecuTorch program with the XNNPACK delegate (whose thread pool
    makes ExecuTorch's runtime print its cpuinfo lines), with the signature file beside it."""
    pytest.importorskip("executorch")
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    folder = tmp_path_factory.mktemp("pte")
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    program = torch.export.export(module, (torch.zeros(1, 4),))
    pte = folder / "mlp.pte"
    pte.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    signature = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]}
    (folder / "mlp.pte.json").write_text(json.dumps({"signature": signature}))
    np.savez(folder / "rows.npz", x=np.ones((3, 4), np.float32))
    return pte


def test_predict_on_an_executorch_version_prints_only_its_own_note(xnnpack_pte, tmp_path):
    # torchao's and torch's import-time warnings and ExecuTorch's cpuinfo lines (C++, straight to fd 2)
    assert leanserve("import", xnnpack_pte, "--name", "mlp", cwd=tmp_path).returncode == 0
    done = leanserve("predict", "mlp", "--input", xnnpack_pte.parent / "rows.npz", "--output", "out.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "using mlp:1, the version serving most traffic (name another as mlp:VERSION)"]
    assert np.load(tmp_path / "out.npz")["y"].shape == (3, 2)


def test_predict_keeps_onnx_runtime_s_own_warnings_quiet_and_shows_them_with_v(unused_initializer_onnx, tmp_path):
    assert leanserve("import", unused_initializer_onnx, "--name", "relu", cwd=tmp_path).returncode == 0
    argv = ("predict", "relu", "--input", tmp_path / "rows.npz", "--output", "out.npz")

    quiet = leanserve(*argv, cwd=tmp_path)
    verbose = leanserve("-v", *argv, cwd=tmp_path)

    assert quiet.returncode == 0 and library_lines(quiet.stderr) == []
    assert verbose.returncode == 0
    assert any("[W:onnxruntime" in line and "Removing initializer 'unused'" in line
               for line in library_lines(verbose.stderr)), verbose.stderr
