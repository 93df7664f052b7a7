"""Requests and answers as files: one request read from .npy/.npz/.json, outputs written to .npz/.npy/.json.

``leanserve predict`` uses these; so can any script that keeps requests on disk.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import Signature
from leanserve.errors import InvalidInput

OUTPUT_SUFFIXES = (".npz", ".json", ".npy")


def read_request(path: str | Path, signature: Signature) -> dict[str, np.ndarray]:
    """Read a request from .npy (one input), .npz (named arrays) or .json (a V2 request or {name: values}).

    Returns named arrays (not yet validated against ``signature``). Raises InvalidInput for a missing,
    unreadable or unsupported file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".json"):
        raise InvalidInput(f"{path.name}: input files must be .npy, .npz or .json")
    try:
        if suffix == ".npy":
            if len(signature.inputs) != 1:
                raise InvalidInput(f"{path.name}: a .npy file holds one array; the model takes "
                                   f"{signature.input_names}: use .npz")
            return {signature.inputs[0].name: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        return _read_json(path, signature)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # a truncated or foreign file
        raise InvalidInput(f"{path}: unreadable input file ({exc})") from None


def _read_json(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    from leanserve.serve.protocol.codec import array_from_json, decode_rest

    body = path.read_bytes()
    doc = json.loads(body)
    if isinstance(doc, dict) and "inputs" in doc:
        return decode_rest(body, None, max_elements=1 << 28).inputs
    if not isinstance(doc, dict):
        raise InvalidInput(f"{path.name}: expected a V2 request or an object of input name -> values")
    return {name: array_from_json(name, signature.input(name).datatype, np.shape(values), values)
            for name, values in doc.items()}


def check_output_path(path: str | Path, outputs: int | None = None) -> Path:
    """Check, before any work, that outputs can be written to ``path``: a known suffix (.npy only for
    one output, when ``outputs`` is known) in an existing folder. Returns the path; raises InvalidInput."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES or (suffix == ".npy" and outputs not in (None, 1)):
        raise InvalidInput(f"{path.name}: output files must be .npz, .json or (one output) .npy")
    if not path.parent.is_dir():
        raise InvalidInput(f"--output {path}: no folder {path.parent} to write into")
    if path.is_dir():
        raise InvalidInput(f"--output {path}: is a folder; name a file")
    return path


def write_outputs(path: str | Path, outputs: dict[str, np.ndarray]) -> None:
    """Write named outputs to .npz, .npy (a single output) or .json. Raises InvalidInput."""
    path = check_output_path(path, len(outputs))
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            np.savez(path, **outputs)
        elif suffix == ".npy":
            np.save(path, next(iter(outputs.values())))
        else:
            path.write_text(json.dumps({k: jsonable(v) for k, v in outputs.items()}))
    except OSError as exc:
        raise InvalidInput(f"--output {path}: cannot write ({exc.strerror})") from None


def outputs_as_json(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Outputs as a JSON-ready document: {name: {datatype, shape, data}}."""
    return {k: {"datatype": str(v.dtype), "shape": list(v.shape), "data": jsonable(v)} for k, v in outputs.items()}


def jsonable(array: np.ndarray) -> Any:
    """An array as nested lists (bytes decoded as UTF-8)."""
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.ravel()]
    return array.tolist()
