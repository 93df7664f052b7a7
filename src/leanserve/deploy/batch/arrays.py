"""Batch input from arrays: .npy (one input, memory-mapped) and .npz (one array per input)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.deploy.batch.chunk import Chunk
from leanserve.errors import InvalidInput


def array_chunks(path: Path, signature: Signature, chunk_rows: int, allow_nonfinite: bool) -> Iterator[Chunk]:
    """The arrays' rows, ``chunk_rows`` at a time, ids being row numbers; rows with NaN or Inf are set aside
    unless ``allow_nonfinite``. Raises InvalidInput for an unreadable file, a missing input, or rows of the
    wrong shape."""
    arrays = _load(path, signature)
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise InvalidInput(f"{path.name}: the arrays have different row counts {sorted(lengths)}")
    total = lengths.pop()
    for index, start in enumerate(range(0, total, chunk_rows)):
        stop = min(start + chunk_rows, total)
        inputs = {name: np.ascontiguousarray(a[start:stop]) for name, a in arrays.items()}
        ids = list(range(start, stop))
        good = np.ones(stop - start, dtype=bool)
        rejects = []
        for spec in signature.inputs:
            array = inputs[spec.name]
            if array.shape[1:] != tuple(d if d != -1 else array.shape[i + 1] for i, d in enumerate(spec.shape[1:])):
                raise InvalidInput(f"{path.name}: input {spec.name!r} rows have shape {list(array.shape[1:])}, "
                                   f"the model takes {list(spec.shape[1:])}")
            if array.dtype != np.dtype(spec.dtype):
                inputs[spec.name] = array = array.astype(spec.dtype)
            if not allow_nonfinite and array.dtype.kind == "f":
                nonfinite = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
                for i in np.flatnonzero(nonfinite & good):
                    rejects.append({"id": ids[i], "reason": f"input {spec.name!r}: NaN or Inf (--allow-nan to pass them)"})
                good &= ~nonfinite
        keep = np.flatnonzero(good)
        yield Chunk(index, [ids[i] for i in keep], {k: v[keep] for k, v in inputs.items()}, rejects)


def array_rows(path: Path) -> int | None:
    """Rows in a .npy file, read from its header; None for other files."""
    if path.suffix.lower() != ".npy":
        return None
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])


def _load(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            if len(signature.inputs) != 1:
                raise InvalidInput(f"{path.name}: a .npy file holds one array; the model takes {signature.input_names}: use .npz")
            return {signature.inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        archive = np.load(path, allow_pickle=False)
        arrays = {spec.name: archive[spec.name] for spec in signature.inputs if spec.name in archive.files}
        missing = [s.name for s in signature.inputs if s.name not in arrays]
        if missing:
            raise InvalidInput(f"{path.name}: no array for input {missing[0]!r}; it holds {', '.join(archive.files)}")
        return arrays
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: unreadable array file ({exc})") from exc
