"""The errors leanserve raises: one small tree, each message written for the user who must act on it.

The protocol layers map these classes to status codes in one table (``serve/protocol/errors.py``);
nothing else knows about status codes.
"""

from __future__ import annotations


class LeanserveError(Exception):
    """Base of every error leanserve raises on purpose."""


class InvalidInput(LeanserveError):
    """A request, file or argument the user gave is malformed or does not match what is expected."""


class InvalidName(InvalidInput):
    """A model name or version is not acceptable (empty, path-like, reserved)."""


class ModelNotFound(LeanserveError):
    """The named model, or the named version of it, does not exist (or is not loaded)."""


class ModelLoadError(LeanserveError):
    """A model file could not be read, verified or loaded by its runtime."""


class CorruptArtifact(ModelLoadError):
    """A version's files do not match the checksums in its manifest, or the manifest is unreadable."""


class UnsupportedFormat(ModelLoadError):
    """The file is not a model format leanserve knows, or the runtime for it is not installed."""


class RepositoryError(LeanserveError):
    """The repository could not complete an operation (e.g. a conflicting concurrent write)."""


class ExportError(LeanserveError):
    """A PyTorch module could not be exported to ONNX, or its export does not match PyTorch."""


class InferenceError(LeanserveError):
    """The engine failed while running a batch (a server-side fault: HTTP 500)."""


class Overloaded(LeanserveError):
    """The server is at capacity; the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(LeanserveError):
    """The server or model is starting, draining or failed to load and cannot answer now."""


class RequestTimeout(LeanserveError):
    """A request did not finish (queue + compute) within its deadline."""


class Unauthorized(LeanserveError):
    """An admin call came without the right bearer token, or from a client not allowed to make it."""


class PayloadTooLarge(InvalidInput):
    """A request body is over the server's size limit."""


class BodyTimeout(InvalidInput):
    """A client did not send its whole request body in time."""


class Forbidden(LeanserveError):
    """The call is not allowed here at all (e.g. the admin API is disabled or remote clients are refused)."""
