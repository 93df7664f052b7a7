"""What a model version is: its files, its signature, its provenance and metrics, and their checksums.

A version folder holds the model file(s) plus ``manifest.json``. The manifest is the single source of
truth for a version; it is written once, when the version is created, and never changed afterwards.
This module imports no engine (no torch, no onnxruntime): reading a manifest must stay cheap.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.dtypes import DATATYPES, V2_TO_NUMPY, v2_datatype
from leanserve.errors import CorruptArtifact, InvalidInput

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
FORMATS: dict[str, str] = {
    # format -> the runtime that serves it by default
    "onnx": "onnxruntime",
    "torchscript": "torch",
    "torch_export": "torch",
    "openvino": "openvino",
    "tvm": "tvm",
    "ort": "onnxruntime",  # ONNX Runtime's flatbuffer format for mobile and embedded builds
    "executorch": "executorch",  # an ExecuTorch program (.pte) for PyTorch's on-device runtime
    "postprocessed": "postprocessed",  # a base model + a per-group decision rule (fairness mitigation)
    "pipeline": "pipeline",  # a model with its pre- and post-processing (tokenizer, image transform, pooling, labels)
    "c_source": "none",  # C99 source for microcontrollers (edge --target c): compiled into firmware, never served
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a signature: a V2 datatype and a shape where -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("a tensor spec needs a non-empty name")
        if self.datatype not in DATATYPES:
            raise InvalidInput(
                f"tensor {self.name!r}: unknown datatype {self.datatype!r}; expected one of {', '.join(DATATYPES)}"
            )
        shape = tuple(int(d) for d in self.shape)
        if any(d < -1 for d in shape):
            raise InvalidInput(f"tensor {self.name!r}: shape {list(shape)} may hold only sizes >= 0 or -1 (dynamic)")
        object.__setattr__(self, "shape", shape)

    @property
    def dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        try:
            return cls(str(data["name"]), str(data["datatype"]), tuple(data["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"a tensor spec needs name, datatype and shape; got {dict(data)!r}") from exc

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse ``name:DATATYPE:d0,d1,...`` (``-1`` for dynamic), as the CLI takes it."""
        parts = text.split(":")
        if len(parts) != 3:
            raise InvalidInput(f"tensor spec {text!r}: expected NAME:DATATYPE:SHAPE, e.g. x:FP32:-1,1,28,28")
        name, datatype, dims = parts
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip()) if dims.strip() else ()
        except ValueError:
            raise InvalidInput(f"tensor spec {text!r}: shape must be comma-separated integers") from None
        return cls(name, datatype.upper(), shape)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Signature:
    """The named input and output tensors of a model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise InvalidInput(f"duplicate {kind} names in signature: {', '.join(dupes)}")

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidInput(f"unexpected input {name!r}; the model takes: {', '.join(self.input_names)}")

    @functools.cached_property
    def _input_names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.inputs)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_outputs(self, requested: Sequence[str]) -> None:
        """Raise InvalidInput if any requested output name is not one of the model's outputs."""
        known = set(self.output_names)
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise InvalidInput(
                f"unknown output {unknown[0]!r} requested; the model has: {', '.join(self.output_names)}"
            )

    def validate_inputs(self, inputs: Mapping[str, np.ndarray], *, allow_nonfinite: bool = True) -> None:
        """Check named arrays against the signature: the one place input validation happens.

        Raises InvalidInput naming the tensor, what was expected and what was received, for a missing
        or extra input, a wrong datatype, a wrong rank or dimension, or (unless ``allow_nonfinite``)
        NaN/Inf values.
        """
        names = self._input_names
        extra = [n for n in inputs if n not in names] if len(inputs) > len(names) or not inputs.keys() <= names else ()
        if extra:
            raise InvalidInput(f"unexpected input {extra[0]!r}; the model takes: {', '.join(self.input_names)}")
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInput(f"missing input {spec.name!r} (expected {spec.datatype} {_fmt_shape(spec.shape)})")
            _check_tensor(spec, inputs[spec.name], allow_nonfinite)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_dict(d) for d in data.get("inputs", [])),
            tuple(TensorSpec.from_dict(d) for d in data.get("outputs", [])),
        )


def _check_tensor(spec: TensorSpec, array: np.ndarray, allow_nonfinite: bool) -> None:
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"input {spec.name!r}: expected a numpy array, got {type(array).__name__}")
    check_declared(spec, v2_datatype(array.dtype), array.shape)
    if not allow_nonfinite and array.dtype.kind == "f" and not _all_finite(array):
        raise InvalidInput(f"input {spec.name!r} contains NaN or Inf values, which this model does not accept")


def _all_finite(array: np.ndarray) -> bool:
    # NaN and Inf reach a float64 sum, and float32/16 values cannot overflow it: one reduction instead of a
    # boolean array. A float64 sum can overflow on finite values, so an infinite sum is checked in full.
    return bool(np.isfinite(array.sum(dtype=np.float64))) or bool(np.isfinite(array).all())


def check_declared(spec: TensorSpec, datatype: str, shape: tuple[int, ...]) -> None:
    """Check a tensor's datatype and shape against its spec before its data is read (a request's header
    says both, so a wrong one is refused without decoding the data). Raises InvalidInput."""
    if datatype != spec.datatype:
        raise InvalidInput(f"input {spec.name!r}: expected datatype {spec.datatype}, got {datatype}")
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r}: expected shape {_fmt_shape(spec.shape)} (rank {len(spec.shape)}), "
            f"got {_fmt_shape(shape)} (rank {len(shape)})"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, shape)):
        if want != -1 and want != have:
            raise InvalidInput(
                f"input {spec.name!r}: dimension {axis} must be {want}, got {have} "
                f"(expected shape {_fmt_shape(spec.shape)}, got {_fmt_shape(shape)})"
            )


@dataclass(frozen=True)
class Provenance:
    """Where a version came from: its source file, parent version, the recipe that produced it, when."""

    source: str | None = None
    parent: str | None = None
    recipe: Mapping[str, Any] | None = None
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    exporter: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``: everything known about one version."""

    format: str
    model_file: str
    signature: Signature
    files: Mapping[str, str]  # relative path -> sha256 hex
    provenance: Provenance = field(default_factory=Provenance)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    runtime: str | None = None  # None: the format's default runtime

    @property
    def default_runtime(self) -> str:
        return self.runtime or FORMATS[self.format]

    def to_json(self) -> str:
        data = {
            "manifest_version": MANIFEST_VERSION,
            "format": self.format,
            "runtime": self.default_runtime,
            "model_file": self.model_file,
            "signature": self.signature.to_dict(),
            "files": dict(self.files),
            "provenance": asdict(self.provenance),
            "metrics": dict(self.metrics),
        }
        return json.dumps(data, indent=2, sort_keys=False, default=_json_default)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            fmt = data["format"]
            if fmt not in FORMATS:
                raise ValueError(f"unknown format {fmt!r}")
            prov = data.get("provenance") or {}
            return cls(
                format=fmt,
                model_file=str(data["model_file"]),
                signature=Signature.from_dict(data["signature"]),
                files={str(k): str(v) for k, v in data["files"].items()},
                provenance=Provenance(**{k: prov.get(k) for k in Provenance.__dataclass_fields__ if k in prov}),
                metrics=dict(data.get("metrics") or {}),
                runtime=data.get("runtime"),
            )
        except (ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
            raise CorruptArtifact(f"{where}: unreadable manifest ({exc})") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a manifest")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks so large models need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """A version folder on disk and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def signature(self) -> Signature:
        return self.manifest.signature

    @property
    def size_bytes(self) -> int:
        return sum((self.path / rel).stat().st_size for rel in self.manifest.files)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> ModelArtifact:
        """Read a version folder's manifest and, if ``verify``, check every file's SHA-256.

        Raises CorruptArtifact when the manifest is missing or unreadable, a file is missing, or a
        checksum differs.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorruptArtifact(f"{path}: no {MANIFEST_FILE}; not a leanserve model version") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptArtifact(f"{manifest_path}: cannot read ({exc})") from exc
        artifact = cls(path, Manifest.from_json(text, where=str(manifest_path)))
        if verify:
            artifact.verify()
        return artifact

    def verify(self) -> None:
        """Raise CorruptArtifact if any file listed in the manifest is missing or changed."""
        for rel, expected in self.manifest.files.items():
            file = self.path / rel
            if not file.is_file():
                raise CorruptArtifact(f"{self.path}: file {rel} listed in the manifest is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise CorruptArtifact(
                    f"{self.path}: checksum mismatch for {rel} (manifest {expected[:12]}…, file {actual[:12]}…); "
                    "the file was changed or damaged after it was written"
                )
