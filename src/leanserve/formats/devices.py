"""Readers of compiled and device artifacts, whose signature is read by their engine or kept in a JSON
sidecar beside them: ONNX Runtime's ORT format, ExecuTorch programs, TVM libraries and C sources."""

from __future__ import annotations

import json
from pathlib import Path

from leanserve.artifact import Signature, TensorSpec
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat


# --- ONNX Runtime format ----------------------------------------------------------------------------

_ORT_MAGIC = b"ORTM"  # the flatbuffer file identifier, at bytes 4-8 of every ORT format model
# ONNX Runtime's element type names -> V2 datatypes (tensor(float) -> float -> FP32)
_ORT_TYPES = {"float": "FP32", "double": "FP64", "float16": "FP16", "bfloat16": "BF16", "int8": "INT8",
              "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16",
              "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL", "string": "BYTES"}


def _read_ort(path: Path) -> tuple[list[Path], Signature]:
    # The ORT format is a flatbuffer with no schema-level reader in onnx; ONNX Runtime itself is the
    # reference reader, so the signature is what an InferenceSession on the file reports.
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:8] != _ORT_MAGIC:
        raise ModelLoadError(f"{path.name}: not an ONNX Runtime (ORT format) model; the file may be corrupt or truncated")
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, RuntimeError) as exc:
        raise ModelLoadError(f"{path.name}: ONNX Runtime cannot read this ORT format model: {str(exc).splitlines()[0]}") from exc
    inputs = tuple(_ort_spec(path, arg) for arg in session.get_inputs())
    outputs = tuple(_ort_spec(path, arg) for arg in session.get_outputs())
    return [], Signature(inputs, outputs)


def _ort_spec(path: Path, arg) -> TensorSpec:
    element = arg.type.removeprefix("tensor(").removesuffix(")")
    if not arg.type.startswith("tensor(") or element not in _ORT_TYPES:
        raise UnsupportedFormat(f"{path.name}: tensor {arg.name!r} has type {arg.type}; only tensors of "
                                "numeric, bool or string elements are supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES[element], shape)


# --- ExecuTorch -------------------------------------------------------------------------------------

def pte_sidecar(program: Path) -> Path:
    """The JSON beside an ExecuTorch program that records its signature: ``model.pte`` -> ``model.pte.json``
    (a .pte keeps tensor types and sizes but not names)."""
    return program.with_name(program.name + ".json")


def _read_executorch(path: Path) -> tuple[list[Path], Signature | None]:
    # The file is a flatbuffer with identifier "ET" + a two-digit schema version at bytes 4-8; the engine
    # checks the rest when it loads the program, so reading needs no ExecuTorch install.
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:6] != b"ET" or not head[6:8].isdigit():
        raise ModelLoadError(f"{path.name}: not an ExecuTorch program (.pte); the file may be corrupt or truncated")
    sidecar = pte_sidecar(path)
    if not sidecar.is_file():
        return [], None  # the caller gives the signature (--input/--output)
    try:
        return [sidecar.resolve()], Signature.from_dict(json.loads(sidecar.read_text(encoding="utf-8"))["signature"])
    except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
        raise ModelLoadError(f"{path.name}: unreadable signature file {sidecar.name} ({exc})") from exc


# --- TVM --------------------------------------------------------------------------------------------

def tvm_sidecar(library: Path) -> Path:
    """The JSON beside a TVM library that records its target and signature: ``m.tvm.so`` -> ``m.tvm.json``."""
    return library.with_name(library.name.removesuffix(".so").removesuffix(".tvm") + ".tvm.json")


def _read_tvm(path: Path) -> tuple[list[Path], Signature]:
    sidecar = tvm_sidecar(path)
    if not sidecar.is_file():
        raise UnsupportedFormat(f"{path.name}: a shared library without the sidecar {sidecar.name} is not a TVM model "
                                "(compile one with `leanserve optimize ... --engines tvm`)")
    try:
        return [sidecar.resolve()], Signature.from_dict(json.loads(sidecar.read_text(encoding="utf-8"))["signature"])
    except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
        raise ModelLoadError(f"{path.name}: unreadable TVM sidecar {sidecar.name} ({exc})") from exc


# --- C source for microcontrollers -------------------------------------------------------------------

def _read_c_source(path: Path) -> tuple[list[Path], Signature]:
    # model.c with model.c.json beside it (written by leanserve edge --target c): the signature of the model
    # it was generated from and the other source files; the C itself is compiled by a device's toolchain.
    sidecar = path.with_name(path.name + ".json")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        files = [path.parent / name for name in meta["files"]]
        signature = Signature.from_dict(meta["signature"])
    except (OSError, ValueError, KeyError, TypeError, InvalidInput) as exc:
        raise ModelLoadError(f"{path.name}: C sources need the file {sidecar.name} written by "
                             f"`leanserve edge MODEL --target c` ({exc})") from exc
    missing = [f.name for f in files if not f.is_file() or f.parent.resolve() != path.parent.resolve()]
    if missing:
        raise ModelLoadError(f"{path.name}: source file(s) {', '.join(missing)} named in {sidecar.name} are missing")
    return [sidecar.resolve(), *(f.resolve() for f in files)], signature
