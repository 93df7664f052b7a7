"""Readers of framework model files, each returning the files a model needs and the signature in it:
ONNX (with external data), TorchScript, torch.export and OpenVINO IR. Each engine is imported lazily."""

from __future__ import annotations

import zipfile
from pathlib import Path

from leanserve.artifact import Signature, TensorSpec
from leanserve.dtypes import v2_datatype
from leanserve.errors import ModelLoadError, UnsupportedFormat


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
