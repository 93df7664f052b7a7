"""The one table from leanserve errors to HTTP status codes and gRPC status codes."""

from __future__ import annotations

import grpc

from leanserve.errors import (
    BodyTimeout,
    Forbidden,
    InvalidInput,
    LeanserveError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)

# Most specific first: the first matching class wins.
_TABLE: tuple[tuple[type[LeanserveError], int, grpc.StatusCode], ...] = (
    (PayloadTooLarge, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BodyTimeout, 408, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InvalidInput, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
    (Overloaded, 503, grpc.StatusCode.UNAVAILABLE),
    (NotReady, 503, grpc.StatusCode.UNAVAILABLE),
    (RequestTimeout, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unauthorized, 401, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, 403, grpc.StatusCode.PERMISSION_DENIED),
)


def http_status(exc: LeanserveError) -> int:
    """HTTP status for an error (500 for anything not a client or capacity problem)."""
    for cls, status, _ in _TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def grpc_status(exc: LeanserveError) -> grpc.StatusCode:
    """gRPC status code for an error (INTERNAL for anything not a client or capacity problem)."""
    for cls, _, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
