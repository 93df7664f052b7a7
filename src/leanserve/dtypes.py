"""Open Inference Protocol (KServe V2) datatypes and their numpy equivalents.

One table, used by the manifest, signature validation and the wire codec alike.
"""

from __future__ import annotations

import ml_dtypes  # a dependency of onnx: gives numpy a real bfloat16
import numpy as np

from leanserve.errors import InvalidInput

# V2 datatype name -> numpy dtype. BYTES is an object array of ``bytes``.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
DATATYPES: tuple[str, ...] = tuple(V2_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype:
    """Return the numpy dtype for a V2 datatype name; raise InvalidInput for an unknown name."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def v2_datatype(dtype: np.dtype) -> str:
    """Return the V2 datatype name of a numpy dtype (str/bytes/object arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None
