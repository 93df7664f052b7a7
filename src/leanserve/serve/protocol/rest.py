"""HTTP/REST transport of the Open Inference Protocol (Starlette): decode, call the data plane, encode."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.errors import BodyTimeout, InvalidInput, LeanserveError, NotReady, Overloaded, PayloadTooLarge
from leanserve.serve.accesslog import AccessLog
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.protocol.codec import BINARY_HEADER, encode_rest, parse_rest, precheck_declared, request_from_rest
from leanserve.serve.protocol.errors import http_status
from leanserve.serve.protocol.feedback import MAX_FEEDBACK_ITEMS, check_feedback_token, feedback_items
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)
JSON = "application/json"
BINARY_HEADER_BYTES = BINARY_HEADER.encode()
LARGE_BODY_BYTES = 1 << 20  # bodies above this are admitted a few at a time (ServerConfig.max_large_bodies)


_ID_BYTES = 16
_ID_BATCH = 256  # ids drawn from the kernel per system call


def _request_ids():
    while True:
        pool = os.urandom(_ID_BYTES * _ID_BATCH).hex()
        yield from (pool[i:i + 2 * _ID_BYTES] for i in range(0, len(pool), 2 * _ID_BYTES))


_IDS = _request_ids()
_IDS_LOCK = threading.Lock()  # a generator must not be resumed by two threads at once


def new_request_id() -> str:
    """A random id (128 bits, 32 hex digits) for a request that brings none. Random, not a counter: the
    id is what feedback labels a prediction by, so another client must not be able to guess it (a
    counter let one client label another's request first). The kernel's random bytes are drawn 256 ids
    at a time: one getrandom call per request showed up in profiles of the event loop under load."""
    with _IDS_LOCK:
        return next(_IDS)


def json_response(doc, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def error_response(exc: LeanserveError, request_id: str | None = None) -> Response:
    status = http_status(exc)
    headers = {k.decode(): v.decode("latin-1") for k, v in error_headers(exc, status, request_id) if k != b"content-type"}
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


def decode_feedback(body: bytes) -> list[tuple[str, int | float]]:
    """(request id, label) pairs from a feedback body, checked as gRPC's are (``protocol.feedback``)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"feedback body is not valid JSON: {exc}") from None
    items = doc.get("feedback") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidInput('feedback body must be {"feedback": [{"id": REQUEST_ID, "label": VALUE}, ...]}')
    if len(items) > MAX_FEEDBACK_ITEMS:  # before looking at each item
        raise InvalidInput(f"at most {MAX_FEEDBACK_ITEMS} feedback items per call, got {len(items)}")
    return feedback_items([(item.get("id"), item.get("label")) if isinstance(item, dict) else (None, None) for item in items])


_MAX_TRACKED = 65_536  # connections whose refusals in a row are remembered


class RestApi:
    """The V2 REST routes over one data plane."""

    def __init__(self, plane: DataPlane, config: ServerConfig, access_log: AccessLog) -> None:
        self.plane = plane
        self.config = config
        self.access_log = access_log
        self._large_in_progress = 0  # bodies over LARGE_BODY_BYTES being read or parsed now
        self._strikes: dict[tuple, int] = {}  # connection (client address) -> refusals in a row

    def routes(self) -> list[Route]:
        """Every route but infer and explain, which ``infer`` answers as plain ASGI (see ``serve/app.py``)."""
        return [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/{model}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}", self.model_metadata, methods=["GET"]),
            Route("/v2/models/{model}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", self.model_ready, methods=["GET"]),
            Route("/v2/models/{model}/feedback", self.feedback, methods=["POST"]),
            # Only reached by what ``match_infer`` does not take first (it answers every POST): other methods get 405.
            *(Route(path, _RoutedInfer(self), methods=["POST"]) for path in (
                "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer",
                "/v2/models/{model}/explain", "/v2/models/{model}/versions/{version}/explain")),
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
            check_feedback_token(request.headers.get("authorization"), self.config.feedback_token)
            body = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
            items = decode_feedback(body)
            return json_response(await self.plane.feedback(request.path_params["model"], items))
        except LeanserveError as exc:
            return error_response(exc)

    # --- inference: plain ASGI, without Starlette's routing and middleware ----------------------------

    def match_infer(self, scope) -> tuple[str, str | None, bool] | None:
        """(model, version, explain) when ``scope`` is a POST to an infer or explain route, else None."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        parts = scope["path"].split("/")  # "", "v2", "models", MODEL, ["versions", VERSION,] ACTION
        if len(parts) == 5:
            version = None
        elif len(parts) == 7 and parts[4] == "versions" and parts[5]:
            version = parts[5]
        else:
            return None
        if parts[1] != "v2" or parts[2] != "models" or not parts[3] or parts[-1] not in ("infer", "explain"):
            return None
        return parts[3], version, parts[-1] == "explain"

    async def infer(self, scope, receive, send, model: str, version: str | None, explain: bool = False) -> None:
        """One V2 infer (or explain) request, answered on ``send``; every error is a JSON answer."""
        started = time.perf_counter()
        headers = _headers(scope)
        request_id = headers.get(b"x-request-id")
        request_id = request_id.decode("latin-1") if request_id else None
        status, served, large, hold = 200, None, False, False
        try:
            # Admission first, from what is known before the body is read: the model, its queue, the size.
            key = headers.get(b"x-routing-key")
            key = key.decode("latin-1") if key is not None else None
            routed = self.plane.route(model, version, key)
            routed.handle.batcher.admit()
            declared = headers.get(b"content-length")
            large = declared is not None and declared.isdigit() and int(declared) > LARGE_BODY_BYTES
            if large:
                self._admit_large()
            body = await _read_asgi_body(receive, declared, self.config.max_body_bytes, self.config.body_timeout_s)
            header_length = headers.get(BINARY_HEADER_BYTES)
            if large and header_length is None:  # refuse a wrong declared shape before parsing megabytes of JSON
                precheck_declared(body, routed.handle.signature, self.config.max_elements)
            doc, binary = parse_rest(body, header_length.decode("latin-1") if header_length is not None else None)
            # routed again now that the body is here: a parameter may carry the routing key, and a reload
            # may have swapped the version while the body arrived (the first routing only admitted it)
            routed = self.plane.route(model, version, key if key is not None else _routing_key(doc))
            infer_request = request_from_rest(doc, binary, max_elements=self.config.max_elements,
                                              signature=routed.handle.signature)
            request_id = request_id or infer_request.id or new_request_id()
            if infer_request.id is None:
                infer_request.id = request_id
            if explain:
                infer_request.parameters["explain"] = True
            result = await self.plane.infer(routed, infer_request, "http")
            served = result.model_version
            payload, header_len = encode_rest(result, infer_request)
            out_headers = [(b"x-request-id", request_id.encode("latin-1"))]
            if header_len is None:
                out_headers.append((b"content-type", b"application/json"))
            else:
                out_headers.append((b"content-type", b"application/octet-stream"))
                out_headers.append((BINARY_HEADER_BYTES, str(header_len).encode()))
        except LeanserveError as exc:
            status = http_status(exc)
            hold = isinstance(exc, Overloaded) or large
            payload, out_headers = orjson.dumps({"error": str(exc)}), error_headers(exc, status, request_id)
            if status >= 500 and status not in (503, 504):
                log.error("request %s to %s failed: %s", request_id, model, exc)
        finally:
            if large:
                self._large_in_progress -= 1
        if hold and self.config.shed_hold_s:
            # Held, not sent at once: a client that ignores Retry-After and retries in a tight loop would
            # otherwise spend the event loop on requests it will be refused (a tarpit for shed load, and
            # for large bodies that were refused)
            await asyncio.sleep(self._hold_s(scope.get("client")))
        elif self._strikes and status == 200:
            self._strikes.pop(scope.get("client"), None)  # served: its next refusal is held the first time again
        out_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})
        if self.access_log.enabled:
            client = scope.get("client")
            self.access_log.write(
                request_id=request_id, method="POST", path=scope["path"], status=status, model=model,
                version=served or version, ms=round((time.perf_counter() - started) * 1000, 3),
                client=client[0] if client else None,
            )


    def _hold_s(self, client) -> float:
        """How long this refusal is held: ``shed_hold_s``, doubled for each refusal in a row on the same
        connection, up to 4x. A client that honours Retry-After sees the first hold only; one that comes
        straight back on a saturated server is slowed down, leaving the event loop to requests that can
        be served (at 2,500 clients refusals took more of it than answers)."""
        strikes = self._strikes.get(client, 0)
        if len(self._strikes) >= _MAX_TRACKED and client not in self._strikes:
            self._strikes.clear()  # bounded: forgetting only makes the next holds shorter
        self._strikes[client] = strikes + 1
        return self.config.shed_hold_s * (1 << min(strikes, 2))

    def _admit_large(self) -> None:
        # Large bodies cost their size in memory several times over while parsing: only a few at a time.
        if self._large_in_progress >= self.config.max_large_bodies:
            raise Overloaded(f"{self._large_in_progress} large requests (over {LARGE_BODY_BYTES // (1 << 20)} MiB) "
                             "are being read already; retry shortly (the binary tensor extension is far cheaper "
                             "than JSON for large tensors)")
        self._large_in_progress += 1


class _RoutedInfer:
    """``RestApi.infer`` as an ASGI app behind a Starlette route (an object, not a function, so Starlette
    passes the raw scope through instead of wrapping it in a Request)."""

    def __init__(self, api: RestApi) -> None:
        self.api = api

    async def __call__(self, scope, receive, send) -> None:
        params = scope["path_params"]
        await self.api.infer(scope, receive, send, params["model"], params.get("version"), scope["path"].endswith("/explain"))


def _headers(scope) -> dict[bytes, bytes]:
    # ASGI servers give header names lower-cased; the first of a repeated header wins
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        found.setdefault(name, value)
    return found


def _routing_key(doc: dict) -> str | None:
    parameters = doc.get("parameters")
    key = parameters.get("routing_key") if isinstance(parameters, dict) else None
    return None if key is None else str(key)


async def _read_asgi_body(receive, declared: bytes | None, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body from ASGI ``receive``, refusing more than ``max_bytes`` and clients slower than
    ``timeout_s``. Raises PayloadTooLarge, BodyTimeout, InvalidInput or NotReady (client gone)."""
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared.decode('latin-1')!r}")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
    # A timer that cancels this task, lighter than asyncio.timeout (which cost ~10 us a request here).
    task = asyncio.current_task()
    expired: list[bool] = []
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, task, expired)
    chunks, size = [], 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise NotReady("the client disconnected before sending its whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    finally:
        timer.cancel()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _expire(task: asyncio.Task, expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def error_headers(exc: LeanserveError, status: int, request_id: str | None) -> list[tuple[bytes, bytes]]:
    """Headers of an error answer: content type, request id, Retry-After for 503s and overload."""
    headers = [(b"content-type", b"application/json")]
    if request_id:
        headers.append((b"x-request-id", request_id.encode("latin-1")))
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None or status == 503:
        headers.append((b"retry-after", str(max(1, int(retry or 1))).encode()))
    return headers
