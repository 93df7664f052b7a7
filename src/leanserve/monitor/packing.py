"""The prediction log's tensor format: named arrays packed as a JSON header and their raw data
(``pack``, ``pack_into``, ``unpack``), and logged rows stacked back into batches (``stack``).

Packing runs on the request path for every logged sample, so it is kept to a header lookup and one
copy of each array; nothing is pickled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson


def pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as bytes: a JSON header (name, dtype, shape, length) then the raw data.

    Not np.savez: its zip container costs ten times more, and this runs for every logged request.
    BYTES (object) arrays are stored as fixed-width byte strings; nothing is pickled.
    """
    out = bytearray()
    pack_into(out, arrays)
    return bytes(out)


def pack_into(out: bytearray, arrays: Mapping[str, np.ndarray]) -> int:
    """Append ``pack(arrays)`` to ``out`` (one copy of each array's data); returns the bytes appended."""
    # Runs for every logged request: kept to the bare minimum (~1 us for a one-tensor request).
    start = len(out)
    data = [array if array.flags.c_contiguous and not array.dtype.hasobject else _contiguous(array)
            for array in arrays.values()]
    out += _header(tuple(zip(arrays, [a.dtype for a in data], [a.shape for a in data])))
    for array in data:
        out += memoryview(array)  # the raw buffer, C order (not ``+= array``: numpy would broadcast an add)
    return len(out) - start


def _contiguous(array: np.ndarray) -> np.ndarray:
    if not array.dtype.hasobject:
        return np.ascontiguousarray(array)
    # BYTES tensors hold bytes (requests) or str (label names a pipeline answers): str as UTF-8, because
    # numpy's astype(bytes) is ASCII-only and a label like "négatif" would fail the request's logging
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
    return np.array(items, dtype=bytes).reshape(array.shape) if items else array.astype(bytes)


@functools.lru_cache(maxsize=256)
def _header(layout: tuple) -> bytes:
    # Requests of one model share a handful of layouts: encode each header once. Keyed on the dtype
    # objects themselves (``dtype.str`` builds a new string on every call).
    head = orjson.dumps([[name, dtype.str, list(shape), dtype.itemsize * math.prod(shape)] for name, dtype, shape in layout])
    return len(head).to_bytes(4, "little") + head


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays ``pack`` stored."""
    size = int.from_bytes(blob[:4], "little")
    offset, arrays = 4 + size, {}
    for name, dtype, shape, length in orjson.loads(blob[4:4 + size]):
        arrays[name] = np.frombuffer(blob, dtype=np.dtype(dtype), count=length // max(np.dtype(dtype).itemsize, 1),
                                     offset=offset).reshape(tuple(shape))
        offset += length
    return arrays



def stack(rows: Sequence[dict[str, Any]], key: str) -> dict[str, np.ndarray]:
    """Concatenate the ``inputs`` or ``outputs`` of logged rows into arrays with a batch axis."""
    if not rows:
        return {}
    return {name: np.concatenate([r[key][name] for r in rows]) for name in rows[0][key]}
