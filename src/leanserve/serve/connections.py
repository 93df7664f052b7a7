"""Connection limits for the HTTP server: a header timeout, a keep-alive timeout and a cap on open
connections, applied to uvicorn (``uvicorn_config``) from ``ServerConfig``.

uvicorn has a keep-alive timeout but no header timeout: a connection that opens and sends nothing, or
trickles its request line and headers a byte at a time, stays open for ever (19,900 such connections
held the server at its fd limit). Its ``limit_concurrency`` answers 503 without Retry-After and also
counts in-flight requests. So the httptools protocol is subclassed here, the smallest change that
closes both gaps: a timer per connection from its opening (or the first byte of a keep-alive
request) until the request's headers are complete, and a 503 with Retry-After (then close) for the
requests of connections beyond ``max_connections``.
"""

from __future__ import annotations

import logging
import resource

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)
_FD_HEADROOM = 256  # files beside the connections: models, the prediction log, gRPC, pipes


async def _over_connection_limit(scope, receive, send) -> None:
    body = orjson.dumps({"error": "too many open connections to this server: retry later"})
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a connection cap (class attributes, set by
    ``protocol_class``)."""

    header_timeout_s: float = 10.0
    max_connections: int = 4096

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            self.app = _over_connection_limit  # this connection's requests: 503, then it closes
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        # A new request on a kept-alive connection: its headers have header_timeout_s from here (uvicorn
        # cancels its keep-alive timer on any byte, so without this a trickler would never be closed).
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_class(config: ServerConfig) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with ``config``'s limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"header_timeout_s": config.header_timeout_s, "max_connections": config.max_connections})


def uvicorn_config(config: ServerConfig, app, **overrides) -> uvicorn.Config:
    """uvicorn's settings for ``app`` as ``config`` says (``overrides``: e.g. ``lifespan`` in tests)."""
    settings = dict(
        host=config.host, port=config.port, log_level="warning", access_log=False,
        http=protocol_class(config), loop="uvloop", timeout_graceful_shutdown=int(config.drain_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s, server_header=False, proxy_headers=False,
    )
    return uvicorn.Config(app, **{**settings, **overrides})


def ensure_fd_limit(max_connections: int) -> None:
    """Raise this process's open-file limit to fit ``max_connections`` (up to the hard limit); warn when it
    cannot, since connections beyond it are refused by the kernel, not answered 503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        if raised < wanted:
            log.warning("max_connections %d needs %d open files; the hard limit is %d (ulimit -Hn): "
                        "connections beyond ~%d will be refused", max_connections, wanted, hard, raised - _FD_HEADROOM)
