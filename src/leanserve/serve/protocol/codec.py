"""The Open Inference Protocol tensor codec: one place that turns wire tensors into numpy and back.

REST (JSON and the binary tensor data extension) and gRPC (typed contents and raw bytes) both call
these functions, so a tensor is decoded and checked the same way whichever transport it came by.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from leanserve.artifact import Signature, check_declared
from leanserve.dtypes import V2_TO_NUMPY, numpy_dtype, v2_datatype
from leanserve.errors import InvalidInput

Parameters = dict[str, Any]
BINARY_HEADER = "inference-header-content-length"
_ORJSON_NATIVE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                        np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as raw binary."""

    name: str
    binary: bool = False


@dataclass
class InferRequest:
    """A decoded inference request, transport-independent."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_output: bool = False  # request-level binary_data_output

    @property
    def output_names(self) -> list[str] | None:
        return [o.name for o in self.outputs] if self.outputs else None


@dataclass
class InferResponse:
    """A transport-independent inference result."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
    output_parameters: dict[str, Parameters] = field(default_factory=dict)  # per output tensor (e.g. attributions)


# --- tensors ----------------------------------------------------------------------------------------

def check_shape(name: str, shape: Any, max_elements: int) -> tuple[int, ...]:
    """Validate a wire shape (list of non-negative ints) and the element count it implies."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidInput(f"input {name!r}: {count} elements exceed the limit of {max_elements} per tensor")
    return tuple(shape)


def array_from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """Build an array from a JSON ``data`` field (flat or nested), checking its length against ``shape``."""
    dtype = numpy_dtype(datatype)
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            flat = [_to_bytes(name, v) for v in _flatten(data)]
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
        elif datatype == "BF16":
            array = np.asarray(data, dtype=np.float32).astype(dtype)
        else:
            array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: data is not a list of {datatype} values") from None
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {expected} values, data has {array.size}")
    return array.reshape(shape)


def array_from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> np.ndarray:
    """Build an array from raw little-endian bytes (BYTES: each element length-prefixed by 4 bytes)."""
    expected = math.prod(shape)
    if datatype == "BYTES":
        items = _split_bytes(name, bytes(raw))
        if len(items) != expected:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {expected} BYTES elements, raw data has {len(items)}")
        array = np.empty(expected, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != expected * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {expected * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def array_to_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of an array (BYTES: 4-byte length prefix per element)."""
    if array.dtype == object or array.dtype.kind in ("U", "S"):
        parts = []
        for item in array.ravel():
            blob = _to_bytes("output", item)
            parts.append(struct.pack("<I", len(blob)))
            parts.append(blob)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def array_to_json_data(array: np.ndarray) -> Any:
    """The flat ``data`` list of an array for JSON (numpy arrays are serialised by orjson directly)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype in _ORJSON_NATIVE:
        return flat
    if flat.dtype == object or flat.dtype.kind in ("U", "S"):
        return [_to_bytes("output", v).decode("utf-8", errors="replace") for v in flat]
    return flat.astype(np.float32).tolist()  # FP16, BF16


def _flatten(data: list) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _to_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.bytes_):
        return bytes(value)
    raise InvalidInput(f"tensor {name!r}: BYTES elements must be strings, got {type(value).__name__}")


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element of {length} bytes runs past the end of the data")
        items.append(raw[offset:offset + length])
        offset += length
    return items


# --- REST (JSON + binary extension) ----------------------------------------------------------------

def decode_rest(body: bytes, header_length: str | None, *, max_elements: int,
                signature: Signature | None = None) -> InferRequest:
    """Decode a V2 REST infer body; ``header_length`` is the Inference-Header-Content-Length header.

    With ``signature``, each input's declared name, datatype and shape are checked against it before its
    data is read. Raises InvalidInput naming the field."""
    doc, binary = parse_rest(body, header_length)
    return request_from_rest(doc, binary, max_elements=max_elements, signature=signature)


def parse_rest(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON document of a V2 REST body and the binary tensor data after it. Raises InvalidInput."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < json_len <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {json_len} is outside the body's {len(body)} bytes")
        head, binary = body[:json_len], memoryview(body)[json_len:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    return doc, binary


# A V2 tensor's header: its name, datatype and shape, in any order, before its data (as every client writes them).
_DECLARED = re.compile(rb'\{\s*(?:"(?:name|datatype|shape)"\s*:\s*(?:"[^"\\]*"|\[[\d\s,]*\])\s*,\s*){3}')


def precheck_declared(body: bytes, signature: Signature, max_elements: int) -> None:
    """Check the tensor headers of a large JSON body against ``signature`` before it is parsed: a regular
    expression finds each tensor's ``name``, ``datatype`` and ``shape`` (in any order, ahead of its
    ``data``) in the raw bytes, so a body that declares a wrong shape is refused without building millions
    of Python floats. A header it cannot find this way is left to the full parse. Raises InvalidInput."""
    for match in _DECLARED.finditer(body):
        header = orjson.loads(match.group(0).rstrip().rstrip(b",") + b"}")
        if set(header) != {"name", "datatype", "shape"} or not isinstance(header["name"], str):
            continue  # a key given twice, or an odd header: the full parse will say what is wrong
        name, datatype = header["name"], header["datatype"]
        if not isinstance(datatype, str) or not isinstance(header["shape"], list):
            continue
        shape = check_shape(name, header["shape"], max_elements)
        check_declared(signature.input(name), datatype, shape)


def request_from_rest(doc: dict[str, Any], binary: memoryview, *, max_elements: int,
                      signature: Signature | None = None) -> InferRequest:
    """An InferRequest from a parsed V2 REST document (see ``decode_rest``). Raises InvalidInput."""
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")
    parameters = _parameters(doc.get("parameters"), "parameters")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be an object with name, datatype, shape and data")
        name, datatype, shape = _tensor_header(item, f"inputs[{i}]", max_elements)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        if signature is not None:
            check_declared(signature.input(name), datatype, shape)
        params = _parameters(item.get("parameters"), f"input {name!r} parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} runs past the binary data ({len(binary) - offset} bytes left)"
                )
            inputs[name] = array_from_bytes(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            inputs[name] = array_from_json(name, datatype, shape, item["data"])
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs but no input claims them")
    binary_all = bool(parameters.pop("binary_data_output", False))
    return InferRequest(inputs, _request_id(doc), parameters, _requested_outputs(doc.get("outputs"), binary_all), binary_all)


def _tensor_header(item: Mapping[str, Any], where: str, max_elements: int) -> tuple[str, str, tuple[int, ...]]:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: 'name' must be a non-empty string")
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}")
    return name, datatype, check_shape(name, item.get("shape"), max_elements)


def _parameters(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be an object")
    return dict(value)


def _request_id(doc: Mapping[str, Any]) -> str | None:
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput("request 'id' must be a string")
    return rid


def _requested_outputs(value: Any, binary_all: bool) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of {name, parameters} objects")
    outputs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a 'name' string")
        params = _parameters(item.get("parameters"), f"output {item['name']!r} parameters")
        outputs.append(RequestedOutput(item["name"], bool(params.get("binary_data", binary_all))))
    return outputs or None


def encode_rest(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """Encode a V2 REST response; returns the body and the JSON header's length when binary follows."""
    binary_names = {o.name for o in request.outputs if o.binary} if request.outputs else (
        set(response.outputs) if request.binary_output else set()
    )
    tensors, blobs = [], []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
        if name in response.output_parameters:
            entry["parameters"] = dict(response.output_parameters[name])
        if name in binary_names:
            blob = array_to_bytes(array)
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array_to_json_data(array)
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = tensors
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_json_request(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> bytes:
    """A V2 JSON request body for ``inputs`` (used by the CLI, tests and benchmarks)."""
    doc: dict[str, Any] = {
        "inputs": [
            {"name": n, "datatype": v2_datatype(a.dtype), "shape": list(a.shape), "data": array_to_json_data(a)}
            for n, a in inputs.items()
        ]
    }
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
