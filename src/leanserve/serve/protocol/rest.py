"""HTTP/REST transport of the Open Inference Protocol (Starlette): decode, call the data plane, encode."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.errors import BodyTimeout, InvalidInput, LeanserveError, PayloadTooLarge
from leanserve.serve.accesslog import AccessLog
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.protocol.codec import BINARY_HEADER, decode_rest, encode_rest
from leanserve.serve.protocol.errors import http_status
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)
JSON = "application/json"
# Request ids for requests that bring none: unique per process start, cheaper than uuid4 per request.
_ID_PREFIX = f"{os.getpid():x}{int(time.time()):x}"
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER)}"


def json_response(doc, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def error_response(exc: LeanserveError, request_id: str | None = None) -> Response:
    status = http_status(exc)
    headers = {"x-request-id": request_id} if request_id else {}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None or status == 503:
        headers["retry-after"] = str(max(1, int(retry or 1)))
    return json_response({"error": str(exc)}, status, headers)


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than ``max_bytes`` and clients slower than ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared!r}")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


MAX_FEEDBACK_ITEMS = 10_000


def decode_feedback(body: bytes) -> list[tuple[str, object]]:
    """(request id, label) pairs from a feedback body; labels are numbers (class index or value)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"feedback body is not valid JSON: {exc}") from None
    items = doc.get("feedback") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidInput('feedback body must be {"feedback": [{"id": REQUEST_ID, "label": VALUE}, ...]}')
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise InvalidInput(f"at most {MAX_FEEDBACK_ITEMS} feedback items per call, got {len(items)}")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InvalidInput(f"feedback[{i}] needs an 'id' string (the request id of the prediction)")
        label = item.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise InvalidInput(f"feedback[{i}] label must be a number (class index or true value), got {label!r}")
        pairs.append((item["id"], label))
    return pairs


class RestApi:
    """The V2 REST routes over one data plane."""

    def __init__(self, plane: DataPlane, config: ServerConfig, access_log: AccessLog) -> None:
        self.plane = plane
        self.config = config
        self.access_log = access_log

    def routes(self) -> list[Route]:
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/{model}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{model}/explain", self.explain, methods=["POST"]),  # leanserve.explain
            Route("/v2/models/{model}/versions/{version}/explain", self.explain, methods=["POST"]),
            Route("/v2/models/{model}/feedback", self.feedback, methods=["POST"]),
        ]

    async def live(self, request: Request) -> Response:
        return json_response({"live": self.plane.live()})

    async def ready(self, request: Request) -> Response:
        ready = self.plane.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.plane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        try:
            doc = self.plane.model_metadata(request.path_params["model"], request.path_params.get("version"))
        except LeanserveError as exc:
            return error_response(exc)
        return json_response(doc)

    async def model_ready(self, request: Request) -> Response:
        try:
            ready = self.plane.model_ready(request.path_params["model"], request.path_params.get("version"))
        except LeanserveError as exc:
            return error_response(exc)
        return json_response({"name": request.path_params["model"], "ready": ready}, 200 if ready else 503)

    async def feedback(self, request: Request) -> Response:
        """Delayed ground truth: {"feedback": [{"id": REQUEST_ID, "label": VALUE}, ...]}."""
        try:
            body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
            items = decode_feedback(body)
            return json_response(await self.plane.feedback(request.path_params["model"], items))
        except LeanserveError as exc:
            return error_response(exc)

    async def explain(self, request: Request) -> Response:
        """An infer body answered with attributions too (leanserve.explain), as ``"explain": true`` asks."""
        return await self.infer(request, explain=True)

    async def infer(self, request: Request, explain: bool = False) -> Response:
        started = time.perf_counter()
        model = request.path_params["model"]
        version = request.path_params.get("version")
        headers = request.headers
        request_id = headers.get("x-request-id")
        status, served = 200, None
        try:
            body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
            infer_request = decode_rest(body, headers.get(BINARY_HEADER), max_elements=self.config.max_elements)
            request_id = request_id or infer_request.id or new_request_id()
            if infer_request.id is None:
                infer_request.id = request_id
            if explain:
                infer_request.parameters["explain"] = True
            result = await self.plane.infer(model, version, infer_request, "http", headers.get("x-routing-key"))
            served = result.model_version
            payload, header_len = encode_rest(result, infer_request)
            out_headers = {"x-request-id": request_id}
            if header_len is None:
                response = Response(payload, media_type=JSON, headers=out_headers)
            else:
                out_headers["inference-header-content-length"] = str(header_len)
                response = Response(payload, media_type="application/octet-stream", headers=out_headers)
        except LeanserveError as exc:
            response = error_response(exc, request_id)
            status = response.status_code
            if status >= 500 and status not in (503, 504):
                log.error("request %s to %s failed: %s", request_id, model, exc)
        if self.access_log.enabled:
            self.access_log.write(
                request_id=request_id, method="POST", path=request.scope["path"], status=status, model=model,
                version=served or version, ms=round((time.perf_counter() - started) * 1000, 3),
                client=request.client.host if request.client else None,
            )
        return response
