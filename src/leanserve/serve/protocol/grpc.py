"""gRPC transport of the Open Inference Protocol (grpc.aio), over the same data plane and codec as REST."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np

from leanserve.artifact import Signature, check_declared
from leanserve.dtypes import v2_datatype
from leanserve.errors import InvalidInput, LeanserveError, Overloaded
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb
from leanserve.serve.protocol import grpc_predict_v2_pb2_grpc as pb_grpc
from leanserve.serve.protocol import leanserve_monitor_pb2 as monitor_pb
from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as monitor_grpc
from leanserve.serve.protocol.codec import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    array_from_bytes,
    array_from_json,
    array_to_bytes,
    check_shape,
)
from leanserve.serve.protocol.errors import grpc_status
from leanserve.serve.protocol.feedback import check_feedback_token, feedback_items
from leanserve.serve.protocol.rest import new_request_id
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)

# V2 datatype -> the InferTensorContents field that carries it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _param_value(param: pb.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def decode_request(request: pb.ModelInferRequest, max_elements: int, signature: Signature | None = None) -> InferRequest:
    """A transport-independent InferRequest from a gRPC ModelInferRequest; with ``signature``, each input's
    declared datatype and shape are checked against it before its contents are read."""
    if not request.inputs:
        raise InvalidInput("request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per input")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}] needs a name")
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        shape = check_shape(name, list(tensor.shape), max_elements)
        if signature is not None:
            check_declared(signature.input(name), tensor.datatype, shape)
        if raw:
            inputs[name] = array_from_bytes(name, tensor.datatype, shape, raw[i])
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInput(f"input {name!r}: datatype {tensor.datatype!r} must be sent in raw_input_contents")
            inputs[name] = array_from_json(name, tensor.datatype, shape, list(getattr(tensor.contents, field)))
    parameters = {k: _param_value(v) for k, v in request.parameters.items()}
    outputs = [
        RequestedOutput(o.name, True) for o in request.outputs
    ] or None
    return InferRequest(inputs, request.id or None, parameters, outputs)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying every output as raw little-endian bytes."""
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id or "")
    for name, array in response.outputs.items():
        tensor = message.outputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
        for key, value in response.output_parameters.get(name, {}).items():  # e.g. an attribution's method
            _set_param(tensor.parameters[key], value)
        message.raw_output_contents.append(array_to_bytes(array))
    return message


def _set_param(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


class GrpcService(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data plane."""

    def __init__(self, plane: DataPlane, config: ServerConfig) -> None:
        self.plane = plane
        self.config = config

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        except LeanserveError as exc:
            await context.abort(grpc_status(exc), str(exc))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request, context):
        try:
            doc = self.plane.model_metadata(request.name, request.version or None)
        except LeanserveError as exc:
            await context.abort(grpc_status(exc), str(exc))
        message = pb.ModelMetadataResponse(name=doc["name"], versions=doc["versions"], platform=doc["platform"])
        for spec in doc["inputs"]:
            message.inputs.add(**spec)
        for spec in doc["outputs"]:
            message.outputs.add(**spec)
        return message

    async def ModelInfer(self, request, context):
        try:
            key = None
            for item in context.invocation_metadata() or ():
                if item[0] == "x-routing-key":
                    key = item[1]
            if key is None and "routing_key" in request.parameters:
                key = str(_param_value(request.parameters["routing_key"]))
            routed = self.plane.route(request.model_name, request.model_version or None, key)
            routed.handle.batcher.admit()  # shed before decoding, as REST does
            infer_request = decode_request(request, self.config.max_elements, routed.handle.signature)
            if infer_request.id is None:
                infer_request.id = new_request_id()
            result = await self.plane.infer(routed, infer_request, "grpc")
            return encode_response(result)
        except LeanserveError as exc:
            if isinstance(exc, Overloaded) and self.config.shed_hold_s:
                await asyncio.sleep(self.config.shed_hold_s)  # held like REST's 503, see RestApi.infer
            await context.abort(grpc_status(exc), str(exc))


class MonitoringService(monitor_grpc.MonitoringServicer):
    """leanserve.Monitoring: delayed labels over gRPC, the same data plane call, checks and caps as REST's
    /feedback (``protocol.feedback``)."""

    def __init__(self, plane: DataPlane, config: ServerConfig) -> None:
        self.plane = plane
        self.config = config

    async def Feedback(self, request, context):
        try:
            metadata = dict(context.invocation_metadata() or ())
            check_feedback_token(metadata.get("authorization"), self.config.feedback_token)
            items = feedback_items([(item.id or None, _label(item)) for item in request.items])
            result = await self.plane.feedback(request.model_name, items)
        except LeanserveError as exc:
            await context.abort(grpc_status(exc), str(exc))
        return monitor_pb.FeedbackResponse(accepted=result["accepted"], unknown=result["unknown"], duplicate=result["duplicate"])


def _label(item: monitor_pb.FeedbackItem) -> int | float | None:
    kind = item.WhichOneof("label")
    return None if kind is None else getattr(item, kind)


def build_grpc_server(plane: DataPlane, config: ServerConfig) -> grpc.aio.Server:
    """A grpc.aio server bound to ``config.host:config.grpc_port`` (not yet started)."""
    limit = min(config.max_body_bytes, 2**31 - 1)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        # the HTTP settings' counterparts: the HTTP/2 handshake must finish within the header timeout, an
        # idle connection is closed (GOAWAY: clients reconnect) after the keep-alive timeout, and
        # connections beyond max_connections are refused
        ("grpc.server_handshake_timeout_ms", int(config.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(config.keep_alive_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcService(plane, config), server)
    monitor_grpc.add_MonitoringServicer_to_server(MonitoringService(plane, config), server)
    address = f"{config.host}:{config.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server


