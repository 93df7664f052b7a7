"""Wiring: one repository, one registry, one data plane, served over REST and gRPC in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.monitor.rollout import RolloutGuard
from leanserve.monitor.status import Monitor
from leanserve.repository import Repository
from leanserve.serve.accesslog import AccessLog
from leanserve.serve.admin import AdminApi
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.monitoring import MonitoringApi
from leanserve.serve.protocol.openapi import openapi_document
from leanserve.serve.protocol.rest import RestApi, json_response
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)


@dataclass
class Server:
    """The parts of a running server, for tests and embedding."""

    config: ServerConfig
    registry: ModelRegistry
    plane: DataPlane
    metrics: ServerMetrics
    app: Starlette
    monitor: Monitor


def build_server(config: ServerConfig, access_log: AccessLog | None = None,
                 registry_factory: Callable[..., ModelRegistry] = ModelRegistry) -> Server:
    """Build (but do not start) the server for ``config``; models load when the app starts.

    ``registry_factory(repo, metrics, drain_timeout_s)`` makes the registry: another one runs the
    versions elsewhere (``ray_serve.RayModelRegistry``: as Ray Serve deployments)."""
    metrics = ServerMetrics()
    repo = Repository(config.repo, create=False)
    registry = registry_factory(repo, metrics, config.drain_timeout_s)
    prediction_log = None
    if config.monitor:
        from leanserve.monitor.store import LogConfig, PredictionLog

        prediction_log = PredictionLog(LogConfig(config.monitor_db or config.repo / ".monitor" / "predictions.db",
                                                 sample_rate=config.monitor_sample_rate))
    plane = DataPlane(registry, metrics, prediction_log, config.explain)
    guard = RolloutGuard(registry, plane, metrics, config.guard_interval_s)
    monitor = Monitor(registry, plane, metrics, config.guard_interval_s, slow_interval_s=10 * config.guard_interval_s)
    rest = RestApi(plane, config, access_log or AccessLog(config.access_log))
    admin = AdminApi(registry, config)
    openapi = openapi_document()

    async def metrics_route(request: Request) -> Response:
        if prediction_log is not None:
            for fate in ("written", "dropped", "failed"):
                metrics.log_samples.labels(fate).set(getattr(prediction_log.stats, fate))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_route(request: Request) -> Response:
        return json_response(openapi)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loader = asyncio.get_running_loop().create_task(_initial_load(registry, config))
        grpc_server = None
        if config.grpc_port is not None:
            from leanserve.serve.protocol.grpc import build_grpc_server

            grpc_server = build_grpc_server(plane, config)
            await grpc_server.start()
        guard.start()
        monitor.start()
        try:
            yield
        finally:
            guard.stop()
            monitor.stop()
            await plane.drain(config.drain_timeout_s)
            if grpc_server is not None:
                await grpc_server.stop(config.drain_timeout_s)
            loader.cancel()
            await registry.close()
            if prediction_log is not None:
                prediction_log.close()
            log.info("server stopped")

    routes = [*rest.routes(), *admin.routes(), *MonitoringApi(monitor).routes(),
              Route("/metrics", metrics_route, methods=["GET"]),
              Route("/openapi.json", openapi_route, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    return Server(config, registry, plane, metrics, app, monitor)


async def _initial_load(registry: ModelRegistry, config: ServerConfig) -> None:
    await registry.sync()
    # Everything alive now (modules, sessions, routes) lives as long as the server: move it out of the
    # collector's sight, so full collections stay short (they showed as 10 ms p99 spikes under load).
    gc.collect()
    gc.freeze()
    ready = {name: sorted(entry.versions) for name, entry in registry.models.items()}
    log.info("ready: %s", ready or "no models")
    registry.start_watching(config.poll_interval_s)


def run_server(config: ServerConfig, registry_factory: Callable[..., ModelRegistry] = ModelRegistry) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and exit."""
    import uvicorn

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("leanserve").setLevel(logging.INFO)
    # Each JSON request allocates hundreds of short-lived floats; a larger first generation means far
    # fewer collections on the request path.
    gc.set_threshold(50_000, 20, 100)
    server = build_server(config, registry_factory=registry_factory)
    uv_config = uvicorn.Config(
        server.app, host=config.host, port=config.port, log_level="warning", access_log=False,
        http="httptools", loop="uvloop", timeout_graceful_shutdown=int(config.drain_timeout_s),
        server_header=False, proxy_headers=False,
    )
    log.info("serving %s on http://%s:%d%s", config.repo, config.host, config.port,
             f" and grpc {config.host}:{config.grpc_port}" if config.grpc_port is not None else "")
    uvicorn.Server(uv_config).run()
