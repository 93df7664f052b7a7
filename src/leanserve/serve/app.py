"""The serving core's HTTP app: the V2 routes, admin and /metrics over one data plane, with the
inference routes answered as plain ASGI before Starlette's routing and middleware (the hot path), and a
lifespan that loads the repository, starts gRPC and the background tasks it is given, and drains.

What runs beside the core (monitoring, explanations, the rollout guard) is composed by
``leanserve.server``; this module knows it only as routes, background tasks and hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from leanserve.serve.accesslog import AccessLog
from leanserve.serve.admin import AdminApi
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.protocol.openapi import openapi_document
from leanserve.serve.protocol.rest import RestApi, json_response
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)


class Background(Protocol):
    """A task beside serving (the monitor's round, the rollout guard): started once the app starts,
    stopped before it drains."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Extras:
    """What the composition root adds to the core: routes, background tasks, blocking warm-ups that run
    before the server reports ready, hooks before each /metrics scrape, and hooks after the drain."""

    routes: Sequence[BaseRoute] = ()
    background: Sequence[Background] = ()
    warm_ups: Sequence[Callable[[], None]] = ()
    on_scrape: Sequence[Callable[[], None]] = ()
    on_drain: Sequence[Callable[[float], object]] = ()  # awaited if they return an awaitable
    on_close: Sequence[Callable[[], None]] = ()


class LeanApp:
    """The ASGI app: infer/explain POSTs go straight to ``RestApi.infer``; everything else to Starlette."""

    def __init__(self, rest: RestApi, starlette: Starlette) -> None:
        self.rest = rest
        self.starlette = starlette

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route the app answers (the infer routes included: they stand in Starlette's table too)."""
        return self.starlette.routes

    async def __call__(self, scope, receive, send) -> None:
        match = self.rest.match_infer(scope)
        if match is None:
            await self.starlette(scope, receive, send)
        else:
            await self.rest.infer(scope, receive, send, *match)


@dataclass
class Core:
    """The serving core of one server."""

    config: ServerConfig
    registry: ModelRegistry
    plane: DataPlane
    metrics: ServerMetrics
    app: LeanApp
    extras: Extras = field(default_factory=Extras)


def build_app(config: ServerConfig, registry: ModelRegistry, plane: DataPlane, metrics: ServerMetrics,
              extras: Extras | None = None, access_log: AccessLog | None = None) -> Core:
    """The ASGI app of the core over ``plane`` (models load when it starts), with ``extras`` added."""
    extras = extras or Extras()
    access_log = access_log or AccessLog(config.access_log)
    rest = RestApi(plane, config, access_log)
    admin = AdminApi(registry, config)
    openapi = openapi_document()

    async def metrics_route(request: Request) -> Response:
        for hook in extras.on_scrape:
            hook()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_route(request: Request) -> Response:
        return json_response(openapi)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loader = asyncio.get_running_loop().create_task(_initial_load(registry, config, extras.warm_ups))
        grpc_server = None
        if config.grpc_port is not None:
            from leanserve.serve.protocol.grpc import build_grpc_server

            grpc_server = build_grpc_server(plane, config)
            await grpc_server.start()
        for task in extras.background:
            task.start()
        try:
            yield
        finally:
            for task in extras.background:
                task.stop()
            plane.drain()
            for hook in extras.on_drain:
                result = hook(config.drain_timeout_s)
                if asyncio.iscoroutine(result):
                    await result
            if grpc_server is not None:
                await grpc_server.stop(config.drain_timeout_s)
            loader.cancel()
            await registry.close()
            for hook in extras.on_close:
                hook()
            access_log.flush()
            log.info("server stopped")

    routes = [*rest.routes(), *admin.routes(), *extras.routes,
              Route("/metrics", metrics_route, methods=["GET"]),
              Route("/openapi.json", openapi_route, methods=["GET"])]
    app = LeanApp(rest, Starlette(routes=routes, lifespan=lifespan))
    return Core(config, registry, plane, metrics, app, extras)


async def _initial_load(registry: ModelRegistry, config: ServerConfig, warm_ups: Sequence[Callable[[], None]]) -> None:
    loop = asyncio.get_running_loop()
    for warm_up in warm_ups:  # before readiness, so it never competes with requests
        await loop.run_in_executor(None, warm_up)
    await registry.sync()
    # Everything alive now (modules, sessions, routes) lives as long as the server: move it out of the
    # collector's sight, so full collections stay short (they showed as 10 ms p99 spikes under load).
    gc.collect()
    gc.freeze()
    ready = {name: sorted(entry.versions) for name, entry in registry.models.items()}
    log.info("ready: %s", ready or "no models")
    registry.start_watching(config.poll_interval_s)


def run_app(config: ServerConfig, app) -> None:
    """Serve ``app`` with uvicorn as ``config`` says (connection limits: ``serve/connections.py``) until
    SIGINT/SIGTERM, then drain in-flight requests and exit."""
    import uvicorn

    from leanserve.serve.connections import ensure_fd_limit, uvicorn_config

    # Each JSON request allocates hundreds of short-lived floats; a larger first generation means far
    # fewer collections on the request path.
    gc.set_threshold(50_000, 20, 100)
    ensure_fd_limit(config.max_connections)
    uv_config = uvicorn_config(config, app)
    log.info("serving %s on http://%s:%d%s", config.repo, config.host, config.port,
             f" and grpc {config.host}:{config.grpc_port}" if config.grpc_port is not None else "")
    uvicorn.Server(uv_config).run()
