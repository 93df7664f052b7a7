"""Recognise a model file's format and read its signature from the model itself.

Each format has one reader that returns a ``ModelSource``: the files that make up the model and the
signature found in it. Engines are imported lazily, inside the reader that needs them.

The readers live beside this module: ``frameworks`` (ONNX, TorchScript, torch.export, OpenVINO) and
``devices`` (ORT format, ExecuTorch, TVM, C sources); models built around another model (post-processed,
pipelines) are read here, since they read their inner model with ``read_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leanserve.artifact import Signature, TensorSpec
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat
from leanserve.formats.devices import _read_c_source, _read_executorch, _read_ort, _read_tvm, pte_sidecar, tvm_sidecar
from leanserve.formats.frameworks import _read_onnx, _read_openvino, _read_torch_export, _read_torchscript

__all__ = ["SUFFIXES", "ModelSource", "detect_format", "pte_sidecar", "read_model", "tvm_sidecar"]

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
