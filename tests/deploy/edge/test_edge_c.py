"""`leanserve edge --target c`: int8 models as dependency-free C99, compiled on the host and compared with ONNX
Runtime's int8, cross-compiled for a Cortex-M4 and run on QEMU, registered as source code that is never served."""

import ctypes
import json
import shutil
import subprocess
from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge.build import REPORT_JSON, REPORT_MD
from leanserve.deploy.edge.c.arena import plan_arena
from leanserve.deploy.edge.c.build import REFERENCE_FILE
from leanserve.deploy.edge.c.cortex_m import MCU_PROFILES, missing_tools
from leanserve.deploy.edge.c.lower import lower
from leanserve.deploy.edge.c.program import UnsupportedOperator
from leanserve.deploy.edge.c.verify import HostModel, compile_host, ort_outputs
from leanserve.errors import UnsupportedFormat

needs_cross = pytest.mark.skipif(bool(missing_tools()), reason=f"{', '.join(missing_tools())} not installed "
                                 "(apt-get install gcc-arm-none-eabi qemu-system-arm; `make test` does)")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no host C compiler")


def _edge(capsys, *argv):
    status = main(["edge", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def cnn_c(tmp_path_factory, digits_cnn_onnx, digits):
    """cnn:1 (the digits CNN), then `leanserve edge cnn:1 --target c` with 360 labelled digits as evaluation data."""
    folder = tmp_path_factory.mktemp("edge-c")
    _, x_test, _, y_test = digits
    np.savez(folder / "eval.npz", image=x_test, labels=y_test)
    repo = Repository(folder / "repo")
    repo.add(digits_cnn_onnx, "cnn")
    status = main(["edge", "cnn:1", "--target", "c", "--profile", "cortex-m4", "--eval", str(folder / "eval.npz"),
                   "--repo", str(repo.root)])
    report = json.loads((repo.get("cnn", 2).path / REPORT_JSON).read_text()) if status == 0 else None
    return repo, status, report, folder


@needs_cc
def test_cnn_c_artifact_agrees_with_onnx_runtime_int8_on_the_held_out_rows(cnn_c):
    _, status, report, _ = cnn_c
    assert status == 0
    holdout, agreement = report["holdout"], report["agreement"]
    assert holdout["part"] == "held-out" and holdout["rows"] == agreement["rows"] == 108  # 30% of 360
    assert report["selection"]["part"] == "selection" and report["selection"]["rows"] == 252
    assert agreement["top1_agreement"] >= 0.995
    assert agreement["max_diff_steps"] <= 1  # the same rounding rule: at most one quantization step apart
    assert holdout["drop"] <= holdout["allowed_drop"] == pytest.approx(0.01)


@needs_cc
def test_cnn_c_version_holds_the_sources_the_reference_model_and_the_report(cnn_c):
    repo, _, _, _ = cnn_c
    artifact = repo.get("cnn", 2)
    assert artifact.manifest.format == "c_source" and artifact.manifest.default_runtime == "none"
    assert {"model.c", "model.c.json", "model.h", "leanserve.h", "kernels.c", "kernels.h", REFERENCE_FILE,
            REPORT_MD, REPORT_JSON} <= set(artifact.manifest.files)
    assert artifact.manifest.provenance.parent == "cnn:1"
    header = (artifact.path / "leanserve.h").read_text()
    assert "int leanserve_predict(const float *input, float *output, void *scratch);" in header
    assert "int leanserve_predict_int8(const int8_t *input" in header and "leanserve_model_info(void)" in header
    for name in ("model.c", "model.h", "kernels.c"):  # nothing beyond stdint.h and string.h, no allocation
        source = (artifact.path / name).read_text()
        assert set(line.split()[1] for line in source.splitlines() if line.startswith("#include <")) <= {
            "<stdint.h>", "<string.h>"}
        assert "malloc" not in source
    assert "source code" in (artifact.path / REPORT_MD).read_text()


@needs_cc
def test_the_registered_sources_compile_alone_and_match_onnx_runtime(cnn_c, tmp_path, digits):
    repo, _, report, _ = cnn_c
    artifact = repo.get("cnn", 2)
    for name in ("model.c", "model.h", "leanserve.h", "kernels.c", "kernels.h"):
        shutil.copy(artifact.path / name, tmp_path / name)
    host = HostModel(compile_host(tmp_path), 784, 10, report["scratch_bytes"])
    rows = digits[1][:40]
    ours = host.predict(rows)
    reference = ort_outputs(artifact.path / REFERENCE_FILE, rows, "image")
    assert (ours.argmax(1) == reference.argmax(1)).all()
    step = lower(artifact.path / REFERENCE_FILE).output_qparams.scale
    assert np.abs(ours - reference).max() <= step * 1.001  # at most one quantization step apart


@needs_cc
def test_the_scratch_arena_shares_memory_between_buffers_that_are_never_live_together(cnn_c):
    repo, _, report, _ = cnn_c
    program = lower(repo.get("cnn", 2).path / REFERENCE_FILE)
    arena = plan_arena(program)
    assert arena.size_bytes == report["scratch_bytes"]
    assert arena.live_peak_bytes <= arena.size_bytes < arena.unshared_bytes
    for a, (a_first, a_last) in arena.lifetimes.items():
        for b, (b_first, b_last) in arena.lifetimes.items():
            if a < b and a_first <= b_last and b_first <= a_last:  # live together: disjoint bytes
                a_end = arena.offsets[a] + program.buffers[a].size
                b_end = arena.offsets[b] + program.buffers[b].size
                assert a_end <= arena.offsets[b] or b_end <= arena.offsets[a], (a, b)


@needs_cross
def test_cnn_c_artifact_fits_a_cortex_m4_and_runs_on_qemu_as_on_the_host(cnn_c):
    _, status, report, _ = cnn_c
    assert status == 0
    footprint, profile = report["footprint"], MCU_PROFILES["cortex-m4"]
    assert report["fits"] and 0 < footprint["flash_bytes"] <= profile.flash_bytes == 256 * 1024
    assert report["scratch_bytes"] < footprint["ram_bytes"] <= profile.ram_bytes == 64 * 1024
    assert footprint["flash_bytes"] >= report["weight_bytes"]  # the weights are in flash, as constants
    qemu = report["qemu"]
    assert qemu["board"] == "mps2-an386" and qemu["rows"] == 5
    assert qemu["top1_agreement"] == 1.0 and qemu["max_abs_diff"] == 0.0  # the same IEEE float32 at both ends
    # about 1.1 M multiply-accumulates, several instructions each
    assert report["macs"] < qemu["instructions_per_inference"] < 100 * report["macs"]


@needs_cc
def test_inspect_and_list_show_the_c_version_and_load_session_refuses_it(cnn_c, capsys):
    from leanserve.runtime import load_session

    repo, _, _, _ = cnn_c
    assert main(["inspect", "cnn:2", "--repo", str(repo.root)]) == 0
    assert "c_source via none" in capsys.readouterr().out
    assert main(["list", "--repo", str(repo.root)]) == 0
    assert "c_source" in capsys.readouterr().out
    with pytest.raises(UnsupportedFormat, match=r"cnn:2 is C source code for microcontrollers .* serve its parent "
                                                r"version \(cnn:1\) instead"):
        load_session(repo.get("cnn", 2))


@needs_cc
def test_the_server_keeps_serving_the_parent_and_never_loads_the_c_version(cnn_c, live_server_factory):
    import httpx

    repo, _, _, _ = cnn_c
    server = live_server_factory(repo.root)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}
    served = httpx.post(server.url + "/v2/models/cnn/infer", json=body, timeout=30)
    assert served.status_code == 200 and served.json()["model_version"] == "1"
    pinned = httpx.post(server.url + "/v2/models/cnn/versions/2/infer", json=body, timeout=30)
    assert pinned.status_code == 404 and "not loaded" in pinned.json()["error"]


# --- a second model: an MLP on tabular data ---------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_repo(tmp_path_factory):
    """A 30-16-2 MLP trained on scikit-learn's breast cancer data (standardized), registered as mlp:1, with
    evaluation data from rows it was not trained on."""
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from leanserve.from_torch import export

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0)
    x_train, x_test = ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x_train)), torch.from_numpy(y_train)).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("mlp")
    export(model.eval(), torch.from_numpy(x_test[:2]), folder / "mlp.onnx", input_names=["features"],
           output_names=["logits"])
    np.savez(folder / "eval.npz", features=x_test, labels=y_test.astype(np.int64))
    repo = Repository(folder / "repo")
    repo.add(folder / "mlp.onnx", "mlp")
    return repo, folder


@needs_cc
def test_an_mlp_on_tabular_data_becomes_c_that_agrees_with_onnx_runtime(mlp_repo, capsys):
    repo, folder = mlp_repo
    status, out, err = _edge(capsys, "mlp", "--target", "c", "--eval", str(folder / "eval.npz"),
                             "--max-accuracy-drop", "2%", "--repo", str(repo.root))
    assert status == 0, err
    report = json.loads((repo.get("mlp", 2).path / REPORT_JSON).read_text())
    assert report["operators"] == ["DequantizeLinear", "Gemm", "QuantizeLinear", "Relu"]
    assert report["holdout"]["rows"] == 68 and report["holdout"]["c_int8"] > 0.9
    assert report["agreement"]["top1_agreement"] >= 0.995
    assert "registered mlp:2" in out


# --- what is refused ----------------------------------------------------------------------------------

def _sigmoid_model(path):
    weight = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
                              "sigmoid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_an_unsupported_operator_is_refused_by_name_with_the_supported_list(tmp_path, capsys):
    repo = Repository(tmp_path / "repo")
    repo.add(_sigmoid_model(tmp_path / "sigmoid.onnx"), "sig")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32))
    status, _, err = _edge(capsys, "sig", "--target", "c", "--calib", str(tmp_path / "calib.npz"), "--repo", str(repo.root))
    assert status == 1
    assert "operator 'Sigmoid'" in err and "is not supported by the C target; supported: QuantizeLinear" in err
    assert "MaxPool" in err and repo.versions("sig") == [1]


def test_a_float_model_is_refused_as_not_int8(tmp_path):
    with pytest.raises(UnsupportedOperator, match="must be View for the C target|is the model int8 QDQ"):
        lower(_sigmoid_model(tmp_path / "sigmoid.onnx"))


@pytest.mark.parametrize("argv, message", [
    (["--profile", "phone"], "unknown microcontroller profile 'phone' for --target c; choose one of cortex-m4"),
    ([], "--target c needs data for static int8: --eval DATA.npz"),
])
def test_bad_profiles_and_missing_data_fail_with_one_line(affine_repo, capsys, argv, message):
    status, _, err = _edge(capsys, "affine", "--target", "c", *argv, "--repo", str(affine_repo.root))
    assert status == 1 and message in err
    assert affine_repo.versions("affine") == [1]


# --- the fixed-point rule -------------------------------------------------------------------------------

@needs_cc
def test_requantization_rounds_once_to_the_nearest_ties_to_even(tmp_path):
    from leanserve.deploy.edge.c import codegen

    kernels = tmp_path / "kernels.c"
    shutil.copy(codegen.__file__.replace("codegen.py", "kernels.c"), kernels)
    shutil.copy(codegen.__file__.replace("codegen.py", "kernels.h"), tmp_path / "kernels.h")
    library = tmp_path / "libkernels.so"
    subprocess.run(["gcc", "-std=c99", "-O2", "-shared", "-fPIC", "-o", str(library), str(kernels)], check=True)
    fn = ctypes.CDLL(str(library)).ls_multiply_by_quantized_multiplier
    fn.argtypes, fn.restype = [ctypes.c_int32] * 3, ctypes.c_int32
    rng = np.random.default_rng(0)
    cases = [(5, 1 << 30, 0), (7, 1 << 30, 0), (-5, 1 << 30, 0), (3, 1 << 30, -1)]  # exact ties: 2.5, 3.5, -2.5, 0.75
    cases += [(int(x), int(m), int(s)) for x, m, s in zip(rng.integers(-1 << 20, 1 << 20, 500),
                                                           rng.integers(1 << 30, (1 << 31) - 1, 500),
                                                           rng.integers(-20, 2, 500))]
    for x, m, s in cases:
        exact = Fraction(x * m, 1) * Fraction(2) ** (s - 31)
        assert fn(x, m, s) == round(exact), (x, m, s)  # Python's round on a Fraction: ties to even
