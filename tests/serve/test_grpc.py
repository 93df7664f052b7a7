"""The gRPC transport, driven with tritonclient.grpc against a real server."""

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from conftest import make_string_model
from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb
from leanserve.serve.protocol import grpc_predict_v2_pb2_grpc as pb_grpc


@pytest.fixture
def server(affine_repo, live_server_factory):
    return live_server_factory(affine_repo.root)


def test_our_proto_matches_the_field_numbers_tritonclient_speaks():
    from tritonclient.grpc import service_pb2 as triton_pb

    def fields(descriptor, prefix=""):
        out = {f"{prefix}{descriptor.name}.{f.name}": (f.number, f.type, f.is_repeated) for f in descriptor.fields}
        for nested in descriptor.nested_types:
            out.update(fields(nested, f"{prefix}{descriptor.name}."))
        return out

    for name, descriptor in pb.DESCRIPTOR.message_types_by_name.items():
        theirs = fields(triton_pb.DESCRIPTOR.message_types_by_name[name])
        for field, signature in fields(descriptor).items():
            assert theirs.get(field) == signature, field


def test_health_metadata_and_inference(server):
    client = triton_grpc.InferenceServerClient(url=server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("affine")
    assert client.get_server_metadata().name == "leanserve"
    meta = client.get_model_metadata("affine")
    assert meta.versions == ["1"] and meta.inputs[0].name == "x" and list(meta.inputs[0].shape) == [-1, 4]
    x = np.random.rand(5, 4).astype(np.float32)
    tensor = triton_grpc.InferInput("x", [5, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("affine", [tensor], request_id="g-1", outputs=[triton_grpc.InferRequestedOutput("s")])
    np.testing.assert_allclose(result.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-5)
    assert result.as_numpy("y") is None
    assert result.get_response().id == "g-1"


def test_typed_contents_without_raw_bytes(server):
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="affine")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    response = stub.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3, 5, 7, 9]
    channel.close()


@pytest.mark.parametrize("model, shape, datatype, code", [
    ("nope", [1, 4], "FP32", "StatusCode.NOT_FOUND"),
    ("affine", [1, 5], "FP32", "StatusCode.INVALID_ARGUMENT"),
    ("affine", [1, 4], "INT32", "StatusCode.INVALID_ARGUMENT"),
])
def test_errors_map_to_grpc_status_codes(server, model, shape, datatype, code):
    client = triton_grpc.InferenceServerClient(url=server.grpc_url)
    tensor = triton_grpc.InferInput("x", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, np.float32 if datatype == "FP32" else np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [tensor])
    assert err.value.status() == code


def test_raw_contents_length_mismatch_is_invalid(server):
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    request = pb.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 12)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 16 bytes, got 12" in err.value.details()


def test_bytes_tensors_over_grpc(repo, tmp_path, live_server_factory):
    repo.add(make_string_model(tmp_path / "s.onnx"), "strings")
    server = live_server_factory(repo.root)
    client = triton_grpc.InferenceServerClient(url=server.grpc_url)
    tensor = triton_grpc.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a", b"bc"], dtype=object))
    assert client.infer("strings", [tensor]).as_numpy("echo").tolist() == [b"a", b"bc"]
