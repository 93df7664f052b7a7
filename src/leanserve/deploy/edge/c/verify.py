"""Run the generated C on this machine: compiled by the host's C compiler into a shared library, called
row by row through ctypes, and compared with ONNX Runtime running the same int8 QDQ model."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.errors import LeanserveError, UnsupportedFormat

# strict C99: the code must build with any conforming compiler, warnings included
HOST_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fPIC", "-shared")


class CompileError(LeanserveError):
    """The generated C did not compile (a leanserve bug): the compiler's first error is in the message."""


@dataclass(frozen=True)
class Agreement:
    """The C outputs next to ONNX Runtime's on the same rows of the same int8 model."""

    rows: int
    top1_agreement: float
    max_abs_diff: float
    max_diff_steps: float  # the largest difference in output quantization steps (output scale units)


def host_compiler() -> str:
    """The host C compiler ($CC, else cc/gcc/clang on PATH); UnsupportedFormat when there is none."""
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise UnsupportedFormat("the C target verifies the generated code with a host C compiler, and none was found "
                            "(install gcc, e.g. apt-get install gcc, or set CC)")


def compile_host(folder: Path, output: Path | None = None) -> Path:
    """Compile ``folder``'s model.c and kernels.c into a shared library; returns its path. Raises
    CompileError with the compiler's first error."""
    output = output or folder / "libleanserve_model.so"
    command = [host_compiler(), *HOST_FLAGS, "-o", str(output), str(folder / "model.c"), str(folder / "kernels.c")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise CompileError(f"the generated C did not compile with {command[0]}: {first}")
    return output


class HostModel:
    """The compiled library, run one row at a time through its public API."""

    def __init__(self, library: Path, input_size: int, output_size: int, scratch_bytes: int) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._lib.leanserve_predict.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.leanserve_predict.restype = ctypes.c_int
        self.input_size, self.output_size = input_size, output_size
        # numpy's allocations are 16-byte aligned, more than the arena's 4
        self._scratch = np.zeros(max(scratch_bytes, 4), np.uint8)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Outputs [N, output_size] for float rows [N, ...] of input_size values each."""
        rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(len(rows), -1)
        if rows.shape[1] != self.input_size:
            raise ValueError(f"each row needs {self.input_size} values, got {rows.shape[1]}")
        out = np.zeros((len(rows), self.output_size), np.float32)
        for i in range(len(rows)):
            status = self._lib.leanserve_predict(rows[i].ctypes.data, out[i].ctypes.data, self._scratch.ctypes.data)
            if status != 0:
                raise RuntimeError(f"leanserve_predict returned {status}")
        return out


def ort_outputs(qdq_model: Path, rows: np.ndarray, input_name: str) -> np.ndarray:
    """ONNX Runtime's outputs for the QDQ model, one row at a time (as the device runs it), flattened.

    The graph runs as written, graph optimizations off: DequantizeLinear, the float operator, then
    QuantizeLinear, which is the arithmetic the ONNX standard defines and gives the same answer on every
    CPU. With its fusions on, ONNX Runtime swaps in int8 kernels whose results depend on the host: on AVX2
    without VNNI its u8 x s8 products saturate in 16 bits, and the C was then 22 quantization steps "off"
    on the digits CNN while agreeing within one step with ONNX Runtime on an AVX-512 VNNI machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(qdq_model), options, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    fixed_batch = isinstance(shape[0], int)
    batch = 1 if fixed_batch else 256
    outputs = [session.run(None, {input_name: np.ascontiguousarray(rows[i:i + batch], np.float32)})[0]
               for i in range(0, len(rows), batch)]
    return np.concatenate(outputs).reshape(len(rows), -1).astype(np.float32)


def agreement(c_out: np.ndarray, ort_out: np.ndarray, step: float | None) -> Agreement:
    """How far the C outputs are from ONNX Runtime's: top-1 agreement per row and the largest difference."""
    diff = float(np.abs(c_out - ort_out).max()) if c_out.size else 0.0
    top1 = float((c_out.argmax(1) == ort_out.argmax(1)).mean()) if c_out.shape[1] > 1 else \
        float((np.rint(c_out) == np.rint(ort_out)).mean())
    return Agreement(len(c_out), top1, diff, round(diff / step, 3) if step else float("nan"))
