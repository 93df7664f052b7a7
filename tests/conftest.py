"""Shared fixtures: real (small) ONNX models built with onnx.helper, real repositories, real servers."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored,
# and so would every command the tests start (an ignored signal survives exec): `leanserve federate` then
# never sees the Ctrl-C its test sends. The tests run as from a terminal: Ctrl-C delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _save(graph, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_affine_model(path: Path, features: int = 4) -> Path:
    """y = 2x + 1 on x FP32 [-1, features]; also s = sum(x) FP32 [-1, 1]."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1])],
        initializer=[two, one, axes],
    )
    return _save(graph, path)


def make_sequence_model(path: Path) -> Path:
    """Variable-length input tokens INT64 [-1,-1] -> doubled FP32 [-1,-1] and their sum FP32 [-1,1]."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Cast", ["tokens"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "two"], ["doubled"]),
        helper.make_node("ReduceSum", ["f", "axes"], ["total"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes, "sequence",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        initializer=[axes, two],
    )
    return _save(graph, path)


def make_string_model(path: Path) -> Path:
    """Identity on a BYTES (ONNX string) tensor [-1]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"])],
    )
    return _save(graph, path)


def make_static_model(path: Path) -> Path:
    """A model with a fixed shape (no batch dim): x FP32 [2,3] -> y = x + 1."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[one],
    )
    return _save(graph, path)


@pytest.fixture
def affine_onnx(tmp_path: Path) -> Path:
    return make_affine_model(tmp_path / "affine.onnx")


@pytest.fixture
def repo(tmp_path: Path):
    from leanserve import Repository

    return Repository(tmp_path / "repo")


@pytest.fixture
def affine_repo(repo, affine_onnx):
    repo.add(affine_onnx, "affine")
    return repo


_PORTS = random.Random()  # its own generator: tests that seed the global one must not pick the same ports


def free_port() -> int:
    """A loopback port no one is listening on, below the kernel's ephemeral range (32768-60999 here), where
    the client side of the tests' own connections never lands: a port from bind(0) comes from that range
    and was now and then taken by an outgoing connection before the server bound it (CI: "address already
    in use" at start-up)."""
    low, high = _ephemeral_range()
    for _ in range(200):
        port = _PORTS.randrange(10_000, low) if low > 11_000 else _PORTS.randrange(high + 1, 65_536)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class LiveServer:
    """A real leanserve server (uvicorn + gRPC) on loopback ports, in a background thread."""

    def __init__(self, repo_path: Path, **overrides) -> None:
        import uvicorn

        from leanserve.serve.accesslog import AccessLog
        from leanserve.server import build_server
        from leanserve.serve.settings import ServerConfig

        self.port, self.grpc_port = free_port(), free_port()
        self.config = ServerConfig(repo=repo_path, port=self.port, grpc_port=self.grpc_port,
                                   poll_interval_s=0.1, drain_timeout_s=5.0, **overrides)
        self.log_lines: list[str] = []
        self.server = build_server(self.config, AccessLog(True, _ListStream(self.log_lines)))
        from leanserve.serve.connections import uvicorn_config

        # the same uvicorn settings `leanserve serve` runs with (header timeout, connection cap)
        self._uvicorn = uvicorn.Server(uvicorn_config(self.config, self.server.app, lifespan="on"))
        self._thread = threading.Thread(target=self._uvicorn.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> LiveServer:
        import httpx

        self._thread.start()

        def ready() -> bool:
            try:
                return httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, what="server ready")
        return self

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=15)


class _ListStream:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture
def live_server_factory():
    servers: list[LiveServer] = []

    def start(repo_path: Path, **overrides) -> LiveServer:
        server = LiveServer(Path(repo_path), **overrides).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def digits_cnn_onnx(tmp_path_factory) -> Path:
    """The demo CNN, trained briefly on real digits and exported (once per test session); its torch.export
    program lies beside it (``torch_source.PROGRAM_FILE``) for tests that attach it."""
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export
    from leanserve.torch_source import save_program

    x_train, x_test, y_train, _ = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=3, progress=False)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export(module, torch.from_numpy(x_test[:2]), path, input_names=["image"], output_names=["logits"])
    save_program(module, torch.from_numpy(x_test[:2]), path.parent)
    return path


def affine_inputs(rows: int = 2, features: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows * features, dtype=np.float32).reshape(rows, features)}


def make_heavy_model(path: Path, width: int = 512, depth: int = 20) -> Path:
    """x FP32 [-1, width] through ``depth`` chained MatMuls: slow enough to build a queue behind it."""
    rng = np.random.default_rng(0)
    weights, nodes, current = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], initializer=weights)
    return _save(graph, path)


def make_failing_model(path: Path) -> Path:
    """Same signature as the affine model; loads and warms up on zeros, but every real request (x = 1..4)
    makes Gather index past its 3-element table, so the engine fails: a canary with a 100% error rate."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64), helper.make_node("Gather", ["table", "i"], ["y"])],
        "failing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        initializer=[onnx.numpy_helper.from_array(np.zeros(3, np.float32), "table")])
    return _save(graph, path)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as 28x28 images: (x_train, x_test, y_train, y_test)."""
    from leanserve.demo import digits_dataset

    return digits_dataset()


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory, digits):
    """A folder with eval.npz (200 held-out digits with labels) and calib.npz (128 training images)."""
    x_train, x_test, _, y_test = digits
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "eval.npz", image=x_test[:200], labels=y_test[:200])
    np.savez(folder / "calib.npz", image=x_train[:128])
    return folder


@pytest.fixture
def cnn_repo(tmp_path, digits_cnn_onnx):
    """A repository holding the trained digits CNN as cnn:1."""
    from leanserve import Repository

    repo = Repository(tmp_path / "repo")
    repo.add(digits_cnn_onnx, "cnn")
    return repo


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """The demo CNN (16/32 conv channels) trained 5 epochs on the real digits: about 0.97 held-out accuracy.
    Passes copy what they change, so one trained model serves every test."""
    from leanserve.demo import train_cnn

    x_train, _, y_train, _ = digits
    return train_cnn(x_train, y_train, epochs=5, progress=False)


@pytest.fixture
def noisy_engine(monkeypatch):
    """An engine that runs ONNX Runtime and adds noise to every output: a miscompiling engine."""
    import sys
    import types

    from leanserve.runtime import ENGINES

    module = types.ModuleType("leanserve_test_noisy_engine")

    def load(artifact, options):
        from dataclasses import replace

        from leanserve.runtime import onnxruntime as ort_engine

        inner = ort_engine.load(artifact, replace(options, engine="onnxruntime"))

        class Noisy:
            engine = "noisy"
            signature = inner.signature

            def run(self, inputs, outputs=None):
                return {k: v + np.float32(0.5) for k, v in inner.run(inputs, outputs).items()}

            def close(self):
                inner.close()

        return Noisy()

    module.load = load
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(ENGINES, "noisy", (module.__name__, None))
    return "noisy"


# --- the test process's exit ---------------------------------------------------------------------------
# A CI rehearsal passed every test, then the interpreter died with SIGSEGV while exiting (no Python frame:
# native libraries' static teardown, in an order that varies with the threads left by ORT, ExecuTorch,
# torch and the live servers), and make reported the crash instead of the result. The result is known
# once the session finishes, so the process ends there with pytest's own exit status, skipping native
# teardown. Only this test process: the CLI's processes exit normally, and the CLI tests check their status.
_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _SESSION_STATUS and os.environ.get("LEANSERVE_TESTS_NATIVE_EXIT") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])
