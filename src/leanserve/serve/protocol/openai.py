"""Endpoints text clients already speak: OpenAI's ``POST /v1/embeddings`` and ``POST /v2/models/{m}/tokenize``.

Both serve text pipeline versions (``leanserve.runtime.pipeline``). Embeddings go through the data plane
like any V2 request (routing, validation, batching, observers); the answer is OpenAI's shape, floats or
base64 of little-endian float32, with ``usage`` counted in tokens. Errors use OpenAI's error object, so
its client raises its own exception types.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.errors import InvalidInput, LeanserveError
from leanserve.serve.protocol.codec import InferRequest, RequestedOutput
from leanserve.serve.protocol.errors import http_status
from leanserve.serve.protocol.rest import json_response

MAX_BODY_BYTES = 16 << 20
MAX_TEXTS = 2048  # OpenAI's own limit on inputs per request


class TextApi:
    """The routes; ``plane`` is the server's DataPlane."""

    def __init__(self, plane) -> None:
        self.plane = plane
        self._stages: dict[Path, Any] = {}  # version folder -> its TextStage (tokenize endpoint)

    def routes(self) -> list[Route]:
        return [Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/v2/models/{model}/tokenize", self.tokenize, methods=["POST"]),
                Route("/v2/models/{model}/versions/{version}/tokenize", self.tokenize, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput("'model': expected the name of a text embedding model")
            texts = _texts(body.get("input"), "input")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise InvalidInput(f"'encoding_format': expected 'float' or 'base64', got {encoding!r}")
            routed = self.plane.route(model, None)
            _check_embedder(routed.handle.signature, model)
            dimensions = body.get("dimensions")
            width = routed.handle.signature.outputs[0].shape[1]
            if dimensions is not None and dimensions != width:
                raise InvalidInput(f"'dimensions': this model's embeddings have {width} dimensions, got {dimensions!r}")
            inputs = {"text": np.array([t.encode("utf-8") for t in texts], dtype=object)}
            wanted = [RequestedOutput("embedding"), RequestedOutput("token_count")]
            answer = await self.plane.infer(routed, InferRequest(inputs, outputs=wanted), "openai")
        except LeanserveError as exc:
            return _openai_error(exc)
        vectors = answer.outputs["embedding"].astype("<f4", copy=False)
        tokens = int(answer.outputs["token_count"].sum())
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        return json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await _json_body(request)
            texts = _texts(body.get("text", body.get("input")), "text")
            routed = self.plane.route(request.path_params["model"], request.path_params.get("version"))
            handle = routed.handle
            if handle.signature.inputs[0].name != "text" or handle.artifact.manifest.format != "pipeline":
                raise InvalidInput(f"model {handle.ref.name!r} takes no text: tokenize serves text pipeline versions "
                                   "(imported with `leanserve import` from a Hugging Face folder)")
            stage = self._stage(handle.artifact.path)
            for row, text in enumerate(texts):
                if not text.strip():
                    raise InvalidInput(f"'text' item {row}: empty text")
            tokens = await asyncio.to_thread(stage.tokens, texts)  # off the event loop
        except LeanserveError as exc:
            return _openai_error(exc)
        return json_response({"model_name": handle.ref.name, "model_version": str(handle.ref.version),
                              "max_length": stage.spec.max_length, "tokens": tokens})

    def _stage(self, folder: Path):
        stage = self._stages.get(folder)
        if stage is None:
            from leanserve.pipeline import SPEC_FILE, PipelineSpec
            from leanserve.pipeline.text import TextSpec, TextStage

            spec = PipelineSpec.read(folder / SPEC_FILE)
            stage = self._stages[folder] = TextStage(folder, TextSpec.from_dict(spec.pre))
        return stage


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInput(f"the body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


def _texts(value: Any, field: str) -> list[str]:
    """A string or a list of strings, as OpenAI's ``input`` takes; token-id arrays are refused."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise InvalidInput(f"'{field}': expected a string or a non-empty list of strings")
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"'{field}': {len(texts)} texts; at most {MAX_TEXTS} per request")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(f"'{field}' item {row}: expected a string, got {type(text).__name__} "
                               "(token ids are not accepted: send the text)")
    return texts


def _check_embedder(signature, model: str) -> None:
    ins, outs = signature.inputs, signature.output_names
    if len(ins) != 1 or ins[0].name != "text" or ins[0].datatype != "BYTES" or "embedding" not in outs:
        raise InvalidInput(f"model {model!r} does not take text and return embeddings; import a sentence "
                           "embedding model with `leanserve import FOLDER --name NAME`")


def _openai_error(exc: LeanserveError) -> Response:
    status = http_status(exc)
    kind = "invalid_request_error" if status < 500 else "server_error"
    doc = {"error": {"message": str(exc), "type": kind, "param": None, "code": None}}
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")
