import struct

import ml_dtypes
import numpy as np
import orjson
import pytest

from leanserve.errors import InvalidInput
from leanserve.serve.protocol.codec import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    decode_rest,
    encode_rest,
)

LIMIT = 1 << 20


def body(*inputs, **extra):
    return orjson.dumps({"inputs": list(inputs), **extra})


@pytest.mark.parametrize("datatype, data, dtype", [
    ("BOOL", [True, False], np.bool_), ("UINT8", [1, 255], np.uint8), ("UINT16", [1, 2], np.uint16),
    ("UINT32", [1, 2], np.uint32), ("UINT64", [1, 2**63], np.uint64), ("INT8", [-1, 2], np.int8),
    ("INT16", [-1, 2], np.int16), ("INT32", [-1, 2], np.int32), ("INT64", [-1, 2**40], np.int64),
    ("FP16", [0.5, 1.5], np.float16), ("FP32", [0.5, 1.5], np.float32), ("FP64", [0.5, 1.5], np.float64),
    ("BF16", [0.5, 1.5], ml_dtypes.bfloat16),
])
def test_every_numeric_datatype_decodes_from_json_and_raw(datatype, data, dtype):
    from_json = array_from_json("t", datatype, (2,), data)
    assert from_json.dtype == np.dtype(dtype) and from_json.astype(np.float64).tolist() == [float(d) for d in data]
    raw = array_to_bytes(from_json)
    np.testing.assert_array_equal(array_from_bytes("t", datatype, (2,), raw), from_json)


def test_bytes_tensors_from_json_strings_and_length_prefixed_raw():
    array = array_from_json("t", "BYTES", (2,), ["a", "\u00e9t\u00e9"])
    assert array.tolist() == [b"a", "\u00e9t\u00e9".encode()]
    raw = array_to_bytes(array)
    assert raw[:4] == struct.pack("<I", 1)
    assert array_from_bytes("t", "BYTES", (2,), raw).tolist() == array.tolist()
    with pytest.raises(InvalidInput, match="runs past the end"):
        array_from_bytes("t", "BYTES", (1,), struct.pack("<I", 10) + b"abc")


def test_nested_and_flat_json_data_give_the_same_array():
    flat = decode_rest(body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}), None, max_elements=LIMIT)
    nested = decode_rest(body({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}), None, max_elements=LIMIT)
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not valid JSON"),
    (b"[1,2]", "must be a JSON object"),
    (orjson.dumps({"inputs": []}), "non-empty 'inputs' list"),
    (body({"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}), "unknown datatype 'FLOAT'"),
    (body({"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}), "shape [2] needs 2 values, data has 1"),
    (body({"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}), "shape must be a list of non-negative integers"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}), "not a list of FP32 values"),
    (body({"name": "x", "datatype": "INT32", "shape": [1], "data": [{"a": 1}]}), "not a list of INT32 values"),
    (body({"name": "x", "datatype": "FP32", "shape": [1]}), "neither 'data' nor a binary_data_size"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}), "appears twice"),
    (body({"name": "x", "datatype": "FP32", "shape": [1 << 21], "data": [1]}), "exceed the limit"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, id=5), "'id' must be a string"),
    (body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, outputs="y"), "'outputs' must be a list"),
])
def test_malformed_requests_are_invalid_input_with_a_precise_message(payload, message):
    with pytest.raises(InvalidInput) as err:
        decode_rest(payload, None, max_elements=LIMIT)
    assert message in str(err.value)


def binary_request(raw: bytes, size: int, header_length=None):
    head = body({"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": size}})
    return head + raw, str(len(head) if header_length is None else header_length)


def test_binary_extension_decodes_raw_tensor_data():
    payload, length = binary_request(np.array([1.5, 2.5], np.float32).tobytes(), 8)
    assert decode_rest(payload, length, max_elements=LIMIT).inputs["x"].tolist() == [1.5, 2.5]


@pytest.mark.parametrize("raw, size, header_length, message", [
    (b"\x00" * 4, 8, None, "runs past the binary data"),
    (b"\x00" * 12, 8, None, "4 bytes of binary data follow"),
    (b"\x00" * 4, 4, None, "needs 8 bytes, got 4"),
    (b"\x00" * 8, 8, "abc", "must be an integer"),
    (b"\x00" * 8, 8, 10**6, "outside the body"),
])
def test_truncated_or_inconsistent_binary_payloads_are_refused(raw, size, header_length, message):
    payload, length = binary_request(raw, size, header_length)
    with pytest.raises(InvalidInput, match=message):
        decode_rest(payload, length, max_elements=LIMIT)


def test_response_encodes_binary_outputs_after_the_json_header():
    request = InferRequest({}, outputs=[RequestedOutput("a", binary=True), RequestedOutput("b")])
    response = InferResponse("m", "1", {"a": np.array([1, 2], np.int32), "b": np.array([0.5], np.float32)}, "req-1")
    payload, header_length = encode_rest(response, request)
    head = orjson.loads(payload[:header_length])
    assert head["id"] == "req-1"
    assert head["outputs"][0] == {"name": "a", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}}
    assert head["outputs"][1]["data"] == [0.5]
    assert np.frombuffer(payload[header_length:], np.int32).tolist() == [1, 2]


def test_request_level_binary_data_output_applies_to_all_outputs():
    request = decode_rest(body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, parameters={"binary_data_output": True}),
                          None, max_elements=LIMIT)
    payload, header_length = encode_rest(InferResponse("m", "1", {"y": np.array([2.0], np.float32)}), request)
    assert header_length is not None and np.frombuffer(payload[header_length:], np.float32).tolist() == [2.0]
