"""Recognise a model file's format and read its signature from the model itself.

Each format has one reader that returns a ``ModelSource``: the files that make up the model and the
signature found in it. Engines are imported lazily, inside the reader that needs them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leanserve.artifact import Signature, TensorSpec
from leanserve.dtypes import v2_datatype
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat

SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript",
            ".pt2": "torch_export", ".xml": "openvino", ".so": "tvm", ".ort": "ort", ".pte": "executorch",
            ".json": "postprocessed", ".c": "c_source"}


@dataclass(frozen=True)
class ModelSource:
    """A model file found on disk: its format, every file it needs, and its signature."""

    format: str
    model_file: Path
    extra_files: tuple[Path, ...]
    signature: Signature


def detect_format(path: Path) -> str:
    """Return the format of a model file from its suffix; raise UnsupportedFormat if unknown."""
    if path.name == "pipeline.json":  # leanserve.pipeline.SPEC_FILE: a model with its pre- and post-processing
        return "pipeline"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UnsupportedFormat(
            f"{path.name}: unknown model format {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(sorted(SUFFIXES))}"
        )
    return fmt


def read_model(
    path: str | Path,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
) -> ModelSource:
    """Identify ``path`` and read its signature; ``inputs``/``outputs`` override what the model says.

    Raises InvalidInput (no such file), UnsupportedFormat or ModelLoadError (corrupt/truncated file).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such model file")
    fmt = detect_format(path)
    reader = _READERS[fmt]
    extra, found = reader(path)
    signature = _merge_signature(path, found, inputs, outputs)
    return ModelSource(fmt, path, tuple(extra), signature)


def _merge_signature(
    path: Path, found: Signature | None, inputs: Sequence[TensorSpec] | None, outputs: Sequence[TensorSpec] | None
) -> Signature:
    if found is None:
        if not inputs or not outputs:
            raise InvalidInput(
                f"{path.name}: this format does not record tensor names and types; give the signature "
                "with --input NAME:DATATYPE:SHAPE and --output NAME:DATATYPE:SHAPE (repeat per tensor)"
            )
        return Signature(tuple(inputs), tuple(outputs))
    if inputs:
        _check_override(path, "input", found.inputs, inputs)
    if outputs:
        _check_override(path, "output", found.outputs, outputs)
    return Signature(tuple(inputs or found.inputs), tuple(outputs or found.outputs))


def _check_override(path: Path, kind: str, found: Sequence[TensorSpec], given: Sequence[TensorSpec]) -> None:
    if [s.name for s in found] != [s.name for s in given]:
        raise InvalidInput(
            f"{path.name}: the model's {kind}s are {[s.name for s in found]}, the given specs name "
            f"{[s.name for s in given]}; give one spec per {kind}, in order, with the model's names"
        )


# --- ONNX -------------------------------------------------------------------------------------------

def _read_onnx(path: Path) -> tuple[list[Path], Signature]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{path.name}: not a readable ONNX model ({exc}); the file may be corrupt or truncated") from exc
    graph = model.graph
    if not graph.node and not graph.output:
        raise ModelLoadError(f"{path.name}: not a readable ONNX model (empty graph); the file may be corrupt or truncated")
    extra = _onnx_external_files(path, model)
    try:
        onnx.checker.check_model(str(path) if extra else model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: invalid ONNX model: {str(exc).splitlines()[0]}") from exc
    initializers = {init.name for init in graph.initializer}
    inputs = tuple(_onnx_spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(_onnx_spec(v) for v in graph.output)
    return extra, Signature(inputs, outputs)


def _onnx_external_files(path: Path, model) -> list[Path]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    files: list[Path] = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = next(e.value for e in tensor.external_data if e.key == "location")
            file = (path.parent / location).resolve()
            if path.parent.resolve() not in file.parents:
                raise ModelLoadError(f"{path.name}: external data {location!r} lies outside the model's folder")
            if not file.is_file():
                raise ModelLoadError(f"{path.name}: external data file {location!r} is missing")
            if file not in files:
                files.append(file)
    return files


def _onnx_spec(value) -> TensorSpec:
    import onnx

    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise UnsupportedFormat(f"tensor {value.name!r}: only tensor inputs/outputs are supported (not sequences or maps)")
    if ttype.elem_type == onnx.TensorProto.STRING:
        datatype = "BYTES"
    elif ttype.elem_type == onnx.TensorProto.BFLOAT16:
        datatype = "BF16"
    else:
        datatype = v2_datatype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
    return TensorSpec(value.name, datatype, shape)


# --- PyTorch ----------------------------------------------------------------------------------------

def _require_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise UnsupportedFormat(
            f"{path.name}: PyTorch models need the torch extra: pip install 'leanserve[torch]'"
        ) from None
    return torch


def _read_torchscript(path: Path) -> tuple[list[Path], None]:
    torch = _require_torch(path)
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path.name}: not a TorchScript archive (not a zip file); the file may be corrupt or truncated")
    try:
        # TorchScript archives hold code and tensors, not arbitrary pickled Python objects.
        torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: not a loadable TorchScript model: {str(exc).splitlines()[0]}") from exc
    return [], None


def _read_torch_export(path: Path) -> tuple[list[Path], Signature]:
    torch = _require_torch(path)
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path.name}: not a torch.export program (not a zip file); the file may be corrupt or truncated")
    try:
        program = torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name}: not a loadable torch.export program: {str(exc).splitlines()[0]}") from exc
    return [], _export_signature(program)


def _export_signature(program) -> Signature:
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(_fake_spec(spec.arg.name, placeholders[spec.arg.name].meta.get("val")))
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = output_node.args[0]
    outputs = [_fake_spec(f"output_{i}", getattr(v, "meta", {}).get("val")) for i, v in enumerate(values)]
    return Signature(tuple(inputs), tuple(outputs))


def _fake_spec(name: str, val) -> TensorSpec:
    if val is None or not hasattr(val, "shape"):
        raise UnsupportedFormat(f"tensor {name!r}: torch.export program has a non-tensor input/output")
    import torch

    shape = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else -1 for d in val.shape)
    datatype = "BF16" if val.dtype == torch.bfloat16 else v2_datatype(torch.empty((), dtype=val.dtype).numpy().dtype)
    return TensorSpec(name, datatype, shape)


# --- OpenVINO ---------------------------------------------------------------------------------------

def _read_openvino(path: Path) -> tuple[list[Path], Signature]:
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise ModelLoadError(f"{path.name}: OpenVINO IR needs its weights file {weights.name} beside it")
    try:
        import openvino as ov
    except ImportError:
        raise UnsupportedFormat(f"{path.name}: OpenVINO models need the openvino extra: pip install 'leanserve[openvino]'") from None
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise ModelLoadError(f"{path.name}: not a readable OpenVINO IR: {str(exc).splitlines()[0]}") from exc

    def spec(port) -> TensorSpec:
        shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        datatype = v2_datatype(port.get_element_type().to_dtype())
        return TensorSpec(port.get_any_name(), datatype, shape)

    return [weights], Signature(tuple(spec(p) for p in model.inputs), tuple(spec(p) for p in model.outputs))


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


# --- post-processed (a base model + a per-group decision rule) ----------------------------------------

def _read_postprocessed(path: Path) -> tuple[list[Path], Signature]:
    from leanserve.fairness.postprocessed import PostprocessSpec, signature_of

    spec = PostprocessSpec.read(path)
    base = read_model(path.parent / spec.base_model)
    if base.format != spec.base_format:
        raise ModelLoadError(f"{path.name}: base model {spec.base_model} is {base.format}, the spec says {spec.base_format}")
    try:
        return [base.model_file.resolve(), *base.extra_files], signature_of(base.signature)
    except InvalidInput as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from exc


# --- pipeline (a model with its pre- and post-processing stages) -------------------------------------

def _read_pipeline(path: Path) -> tuple[list[Path], Signature]:
    from leanserve.pipeline import PipelineSpec, signature_of

    spec = PipelineSpec.read(path)
    inner = read_model(path.parent / spec.model_file)
    if inner.format != spec.model_format:
        raise ModelLoadError(f"{path.name}: model {spec.model_file} is {inner.format}, the spec says {spec.model_format}")
    stage_files = [path.parent / name for name in spec.files]
    missing = [f.name for f in stage_files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{path.name}: pipeline file(s) {', '.join(missing)} are missing")
    return [inner.model_file.resolve(), *inner.extra_files, *(f.resolve() for f in stage_files)], signature_of(spec, inner.signature)


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


_READERS = {
    "onnx": _read_onnx,
    "torchscript": _read_torchscript,
    "torch_export": _read_torch_export,
    "openvino": _read_openvino,
    "tvm": _read_tvm,
    "ort": _read_ort,
    "executorch": _read_executorch,
    "postprocessed": _read_postprocessed,
    "pipeline": _read_pipeline,
    "c_source": _read_c_source,
}
