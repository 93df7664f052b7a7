"""The one port ``leanserve federate --listen`` opens: Flower's Fleet API and nothing else, optionally in TLS.

The SuperLink itself listens on a Unix socket only this user can reach (``socket_patch``). This front
accepts the SuperNodes' calls on HOST:PORT and forwards those whose method and path are exactly one of the
Fleet API's routes (taken from Flower's own router, so the list follows the pinned Flower) to the socket,
in TLS to the SuperLink's own certificate, headers and all (the SuperNodes' signatures included);
everything else, the Control API that submits runs and the Runtime API that ServerApps use included, is
answered 404 without reaching Flower.

Written here because Flower has no switch to serve the Fleet API alone, and a general proxy (nginx, Envoy)
would be one more program to install and configure on every server; Starlette, uvicorn and httpx are
already Flower's own dependencies.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from leanserve.learn.federated.keys import SUPERLINK_HOST

log = logging.getLogger(__name__)

# Connection-level headers are the hop's own (RFC 9110 7.6.1), never forwarded.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host"})


@dataclass(frozen=True)
class TlsFiles:
    """The certificate chain and private key (PEM files) the public port presents to SuperNodes."""

    cert: Path
    key: Path

    def check(self) -> TlsFiles:
        """These files if they load as a certificate and its key; InvalidInput naming the flag otherwise."""
        from leanserve.errors import InvalidInput

        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            if not Path(path).is_file():
                raise InvalidInput(f"{flag} {path}: no such file")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidInput(f"--tls-cert {self.cert} / --tls-key {self.key}: not a PEM certificate and its "
                               f"private key ({exc})") from None
        return self


def fleet_routes() -> frozenset[tuple[str, str]]:
    """(method, path) of every route of Flower's Fleet API."""
    from flwr.superlink.routers.fleet.router import router

    return frozenset((method, route.path) for route in router.routes for method in route.methods)


def build_app(socket_path: Path, superlink_ca: Path):
    """A Starlette app that forwards Fleet API calls to the SuperLink on ``socket_path`` (in TLS, trusting
    the SuperLink's certificate ``superlink_ca``) and refuses the rest."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    allowed = fleet_routes()
    # Model updates can take minutes to arrive from slow links: no read timeout, a bounded connect.
    trusted = ssl.create_default_context(cafile=str(superlink_ca))
    client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=trusted),
                               timeout=httpx.Timeout(None, connect=10.0))

    async def forward(request):
        path = request.url.path
        if (request.method, path) not in allowed:
            return PlainTextResponse("not found: this port serves only Flower's Fleet API (SuperNodes)\n", 404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        upstream = client.build_request(request.method, f"https://{SUPERLINK_HOST}{path}", headers=headers,
                                        content=request.stream())
        response = await client.send(upstream, stream=True)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 headers={k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP},
                                 background=BackgroundTask(response.aclose))

    @asynccontextmanager
    async def lifespan(app):
        async with client:
            yield

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


class FleetFront:
    """The public port (in TLS with ``tls``): ``start`` serves ``build_app`` on ``sock`` (already bound) in a
    thread, ``stop`` ends it."""

    def __init__(self, sock: socket.socket, socket_path: Path, superlink_ca: Path, tls: TlsFiles | None = None) -> None:
        import uvicorn

        config = uvicorn.Config(build_app(socket_path, superlink_ca), log_level="warning", lifespan="on",
                                access_log=False, ssl_certfile=str(tls.cert) if tls else None,
                                ssl_keyfile=str(tls.key) if tls else None)
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="leanserve-fleet-front", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
