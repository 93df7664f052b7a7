"""The OpenVINO engine: same answers as ONNX Runtime, device and hint selection, load failures, no aliasing."""

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from conftest import affine_inputs, make_heavy_model, make_sequence_model, make_static_model  # noqa: E402
from leanserve import Repository, RuntimeOptions  # noqa: E402
from leanserve.artifact import Manifest, ModelArtifact  # noqa: E402
from leanserve.errors import ModelLoadError, UnsupportedFormat  # noqa: E402
from leanserve.formats import read_model  # noqa: E402
from leanserve.runtime import load_session  # noqa: E402
from leanserve.runtime.openvino import choose_device, compile_config  # noqa: E402

OPENVINO = RuntimeOptions(engine="openvino", intra_op_threads=2)


def _artifact(path: Path) -> ModelArtifact:
    return ModelArtifact(path.parent, Manifest("onnx", path.name, read_model(path).signature, {}))


def _both_engines(path: Path, inputs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    artifact = _artifact(path)
    ours = load_session(artifact, OPENVINO).run(inputs)
    reference = load_session(artifact, RuntimeOptions(engine="onnxruntime")).run(inputs)
    return ours, reference


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_outputs_match_onnxruntime_at_any_batch_size(tmp_path, rows):
    ours, reference = _both_engines(make_heavy_model(tmp_path / "heavy.onnx", width=64, depth=6),
                                     {"x": np.random.default_rng(rows).standard_normal((rows, 64), dtype=np.float32)})
    assert ours["y"].shape == (rows, 64)
    np.testing.assert_allclose(ours["y"], reference["y"], rtol=1e-4, atol=1e-4)


def test_variable_batch_and_length_integer_inputs_match_onnxruntime(tmp_path):
    path = make_sequence_model(tmp_path / "seq.onnx")
    for shape in [(1, 5), (4, 2), (2, 9)]:
        tokens = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
        ours, reference = _both_engines(path, {"tokens": tokens})
        for name in ("doubled", "total"):
            np.testing.assert_allclose(ours[name], reference[name], rtol=1e-4, atol=1e-4)


def test_fixed_shape_model_runs(tmp_path):
    ours, reference = _both_engines(make_static_model(tmp_path / "static.onnx"), {"x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(ours["y"], reference["y"])


def test_consecutive_runs_return_independent_arrays(tmp_path):
    session = load_session(_artifact(make_heavy_model(tmp_path / "heavy.onnx", width=32, depth=2)), OPENVINO)
    first = session.run({"x": np.ones((2, 32), np.float32)})["y"]
    kept = first.copy()
    second = session.run({"x": np.full((2, 32), -3.0, np.float32)})["y"]
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)  # the second run did not overwrite the first's result


def test_each_thread_gets_its_own_answers(tmp_path):
    session = load_session(_artifact(make_heavy_model(tmp_path / "heavy.onnx", width=32, depth=2)), OPENVINO)
    inputs = {i: np.full((3, 32), float(i), np.float32) for i in range(4)}
    expected = {i: session.run({"x": x})["y"] for i, x in inputs.items()}
    mismatches = []

    def worker(i: int) -> None:
        for _ in range(20):
            if not np.array_equal(session.run({"x": inputs[i]})["y"], expected[i]):
                mismatches.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


def test_requested_outputs_only(tmp_path):
    session = load_session(_artifact(make_sequence_model(tmp_path / "seq.onnx")), OPENVINO)
    out = session.run({"tokens": np.ones((2, 3), np.int64)}, ["total"])
    assert list(out) == ["total"] and out["total"].tolist() == [[3.0], [3.0]]


def test_auto_prefers_gpu_then_npu_then_cpu():
    assert choose_device("auto", ["CPU"]) == "CPU"
    assert choose_device("auto", ["CPU", "NPU"]) == "NPU"
    assert choose_device("auto", ["CPU", "NPU", "GPU.0", "GPU.1"]) == "GPU.0"


def test_explicit_device_is_matched_by_family_or_refused_naming_what_exists():
    assert choose_device("gpu", ["CPU", "GPU.1"]) == "GPU.1"
    assert choose_device("cpu", ["CPU", "GPU"]) == "CPU"
    with pytest.raises(UnsupportedFormat, match=r"device 'npu' is not available here; available: CPU, GPU"):
        choose_device("npu", ["CPU", "GPU"])


@pytest.mark.parametrize("hint, expected", [("auto", "LATENCY"), ("latency", "LATENCY"), ("throughput", "THROUGHPUT")])
def test_performance_hint_follows_the_options(hint, expected):
    assert compile_config("GPU.0", RuntimeOptions(performance_hint=hint))["PERFORMANCE_HINT"] == expected


def test_cpu_is_pinned_with_the_requested_threads_and_other_devices_are_not():
    cpu = compile_config("CPU", RuntimeOptions(intra_op_threads=2))
    assert cpu["ENABLE_CPU_PINNING"] is True and cpu["INFERENCE_NUM_THREADS"] == 2
    assert "INFERENCE_NUM_THREADS" not in compile_config("CPU", RuntimeOptions())
    assert not {"ENABLE_CPU_PINNING", "INFERENCE_NUM_THREADS"} & set(compile_config("GPU", RuntimeOptions(intra_op_threads=2)))


def test_fp32_means_fp32_even_where_the_engine_would_pick_bf16():
    assert compile_config("CPU", RuntimeOptions())["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config("GPU", RuntimeOptions(precision="fp16"))["INFERENCE_PRECISION_HINT"] == "f16"


def test_compiled_model_carries_the_chosen_settings(tmp_path):
    options = RuntimeOptions(engine="openvino", intra_op_threads=1, performance_hint="throughput", device="cpu")
    session = load_session(_artifact(make_static_model(tmp_path / "static.onnx")), options)
    assert session.device == "CPU"
    assert str(session.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert session.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert session.compiled.get_property("ENABLE_CPU_PINNING") is True


def test_absent_explicit_device_is_refused_at_load(tmp_path):
    import openvino as ov

    missing = next(d for d in ("npu", "gpu") if not any(a.startswith(d.upper()) for a in ov.Core().available_devices))
    with pytest.raises(UnsupportedFormat, match=f"device '{missing}' is not available here; available: "):
        load_session(_artifact(make_static_model(tmp_path / "static.onnx")), RuntimeOptions(engine="openvino", device=missing))


def test_corrupt_model_is_a_load_error_with_the_engines_reason(tmp_path):
    path = make_static_model(tmp_path / "static.onnx")
    artifact = _artifact(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"OpenVINO cannot read static.onnx: Unable to read the model") as info:
        load_session(artifact, OPENVINO)
    assert "Exception from" not in str(info.value)  # source locations stripped


def test_unsupported_operator_is_a_load_error_naming_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    artifact = ModelArtifact(tmp_path, Manifest("onnx", "custom.onnx", read_model(tmp_path / "custom.onnx").signature, {}))
    with pytest.raises(ModelLoadError, match="example.custom.Frobnicate"):
        load_session(artifact, OPENVINO)


def test_repository_version_recorded_for_openvino_loads_with_it(tmp_path, affine_onnx):
    repo = Repository(tmp_path / "repo")
    ref = repo.add(affine_onnx, "affine", runtime="openvino")
    session = load_session(repo.get("affine", ref.version))
    assert session.engine == "openvino"
    out = session.run(affine_inputs(3))
    np.testing.assert_allclose(out["y"], affine_inputs(3)["x"] * 2 + 1)
    np.testing.assert_allclose(out["s"], affine_inputs(3)["x"].sum(axis=1, keepdims=True))


@pytest.mark.parametrize("batching, hint", [(False, "LATENCY"), (True, "THROUGHPUT")])
def test_the_auto_hint_follows_the_serving_mode(affine_onnx, tmp_path, batching, hint):
    from leanserve import Repository
    from leanserve.config import BatchingConfig, ModelConfig
    from leanserve.serve.metrics import ServerMetrics
    from leanserve.serve.registry import ModelRegistry

    repo = Repository(tmp_path / "repo")
    ref = repo.add(affine_onnx, "affine", runtime="openvino")
    config = ModelConfig(batching=BatchingConfig(enabled=batching), warmup=False)
    sessions = ModelRegistry(repo, ServerMetrics())._load_blocking(ref, config)[1]
    assert str(sessions[0].compiled.get_property("PERFORMANCE_HINT")) == hint


def test_bf16_precision_reaches_openvino(affine_repo):
    from leanserve.config import RuntimeOptions
    from leanserve.runtime import load_session

    import openvino as ov

    session = load_session(affine_repo.get("affine"), RuntimeOptions(engine="openvino", precision="bf16"))
    hint = str(session.compiled.get_property("INFERENCE_PRECISION_HINT"))
    bf16_cpu = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ("bfloat16" in hint) if bf16_cpu else ("f32" in hint or "float32" in hint)  # no bf16: f32, not a failure
