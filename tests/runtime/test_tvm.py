import json
import threading
from pathlib import Path

import numpy as np
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm", reason="the TVM engine needs the tvm extra: pip install 'leanserve[tvm]'")

from conftest import _save, make_affine_model, make_static_model  # noqa: E402
from leanserve import RuntimeOptions  # noqa: E402
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat  # noqa: E402
from leanserve.formats import read_model  # noqa: E402
from leanserve.runtime import load_session, prepare  # noqa: E402
from leanserve.runtime.tvm import host_cpu  # noqa: E402


def make_conv_model(path: Path) -> Path:
    """A small CNN, x FP32 [-1,1,8,8] -> logits FP32 [-1,10]: Conv, BatchNorm, Relu, MaxPool, Gemm."""
    rng = np.random.default_rng(0)

    def init(name, *shape, low=-0.5, high=0.5):
        return onnx.numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[init("w", 4, 1, 3, 3), init("b", 4), init("scale", 4, low=0.5, high=1.5), init("shift", 4),
                     init("mean", 4), init("var", 4, low=0.5, high=1.5), init("fc_w", 10, 64), init("fc_b", 10)],
    )
    return _save(graph, path)


def compile_tvm(onnx_path: Path) -> Path:
    """Compile without tuning (a zero budget) beside the ONNX file; returns the library."""
    return prepare("tvm", onnx_path, onnx_path.parent, read_model(onnx_path).signature, RuntimeOptions(),
                   time_budget_s=0)


def onnxruntime_outputs(onnx_path: Path, inputs: dict) -> dict:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))


@pytest.fixture
def affine_library(tmp_path) -> Path:
    return compile_tvm(make_affine_model(tmp_path / "affine.onnx"))


def test_compiled_model_is_added_and_served_by_its_version_engine(repo, affine_library, tmp_path):
    repo.add(affine_library, "affine")
    artifact = repo.get("affine")
    assert (artifact.manifest.format, artifact.manifest.default_runtime) == ("tvm", "tvm")
    session = load_session(artifact)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    got, want = session.run({"x": x}), onnxruntime_outputs(tmp_path / "affine.onnx", {"x": x})
    assert session.engine == "tvm" and list(got) == ["y", "s"]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4)
    session.close()


def test_conv_model_with_batchnorm_matches_onnxruntime(repo, tmp_path):
    onnx_path = make_conv_model(tmp_path / "conv.onnx")
    repo.add(compile_tvm(onnx_path), "conv")
    session = load_session(repo.get("conv"))
    x = np.random.default_rng(2).uniform(size=(5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run({"x": x})["logits"], onnxruntime_outputs(onnx_path, {"x": x})["logits"],
                               atol=1e-4)


def test_sidecar_records_target_cpu_static_shapes_and_no_tuning(affine_library):
    sidecar = json.loads(affine_library.with_name("affine.tvm.json").read_text())
    assert sidecar["target"]["kind"] == "llvm" and sidecar["target"]["mcpu"] == host_cpu() == sidecar["host_cpu"]
    assert sidecar["compiled_shapes"] == {"x": [1, 4]} and sidecar["batch_rows"] is True
    assert sidecar["tuned"] is False and sidecar["tvm_version"]
    # The served signature keeps the batch dynamic: larger batches run row by row.
    assert sidecar["signature"]["outputs"][1] == {"name": "s", "datatype": "FP32", "shape": [-1, 1]}


def test_library_built_for_another_cpu_is_refused_naming_both_cpus(repo, affine_library):
    sidecar = affine_library.with_name("affine.tvm.json")
    data = json.loads(sidecar.read_text())
    data["target"]["mcpu"] = data["host_cpu"] = "imaginary-cpu"
    sidecar.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=f"CPU 'imaginary-cpu'; this machine's CPU is '{host_cpu()}'"):
        repo.add(affine_library, "affine")
    assert repo.versions("affine") == []


def test_corrupt_library_is_refused(repo, affine_library):
    # a new file, not the compiled one rewritten in place: compiling dlopen()ed it, and truncating a
    # mapped library makes the process die with SIGBUS when it next touches those pages (at exit)
    affine_library.unlink()
    affine_library.write_bytes(b"\x7fELF not really a shared library")
    with pytest.raises(ModelLoadError, match="TVM .* cannot load affine.tvm.so"):
        repo.add(affine_library, "affine")


def test_shared_library_without_sidecar_is_not_a_model(tmp_path):
    (tmp_path / "other.so").write_bytes(b"\x7fELF")
    with pytest.raises(UnsupportedFormat, match="without the sidecar other.tvm.json"):
        read_model(tmp_path / "other.so")


def test_input_of_another_shape_is_refused_naming_the_compiled_shape(repo, affine_library, tmp_path):
    repo.add(affine_library, "affine")
    with pytest.raises(InvalidInput, match=r"input 'x': this TVM build was compiled for shape \[N,4\], got \[2, 5\]"):
        load_session(repo.get("affine")).run({"x": np.zeros((2, 5), np.float32)})
    repo.add(compile_tvm(make_static_model(tmp_path / "static.onnx")), "static")
    with pytest.raises(InvalidInput, match=r"compiled for shape \[2, 3\], got \[3, 3\]"):
        load_session(repo.get("static")).run({"x": np.zeros((3, 3), np.float32)})


def test_session_answers_several_threads_at_once(repo, affine_library):
    repo.add(affine_library, "affine")
    session = load_session(repo.get("affine"), RuntimeOptions(intra_op_threads=1))
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = session.run({"x": np.full((2, 4), i, np.float32)}, ["y"])["y"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: float(r[0, 0]) for i, r in results.items()} == {i: 2.0 * i + 1 for i in range(4)}


def test_onnx_version_is_not_served_by_tvm(affine_repo):
    with pytest.raises(UnsupportedFormat, match="serves libraries compiled by TVM, not onnx models"):
        load_session(affine_repo.get("affine"), RuntimeOptions(engine="tvm"))


def test_tvm_compiles_for_the_cpu_only(tmp_path):
    onnx_path = make_affine_model(tmp_path / "affine.onnx")
    with pytest.raises(UnsupportedFormat, match="CPU only"):
        prepare("tvm", onnx_path, tmp_path, read_model(onnx_path).signature, RuntimeOptions(device="gpu"), 0)
