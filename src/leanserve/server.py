"""The composition root of ``leanserve serve``: the serving core (``serve/``) with the optional features
wired around it, each only when it is on.

This is the one module that imports both ``serve`` and the features that watch it (``monitor``,
``explain``); neither side imports the other. A feature that is off is not composed, so it costs
nothing on the request path. What runs in the background, and its switch:

- the repository watch (``--poll-interval``): new, removed and changed versions;
- the prediction log's writer process (``--no-monitor``, ``--monitor-sample-rate``);
- the monitor's round (``--no-monitor``): live windows and alerts every second, quality, bias and drift
  from the log every ten;
- the rollout guard (always: it acts only on a model with a canary running);
- live explanation sampling (``--explain-sample-interval``, off by default), within
  ``--explain-sample-cpu-share`` of one core, its SHAP kernels compiled before the server reports ready.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from leanserve.errors import InvalidInput, LeanserveError
from leanserve.explain.service import ExplanationService, ImportanceSampler
from leanserve.monitor.live import LiveStats
from leanserve.monitor.observers import LiveSignals, LiveStatsObserver, PredictionLogObserver
from leanserve.monitor.rollout import RolloutGuard
from leanserve.monitor.status import Monitor
from leanserve.repository import Repository
from leanserve.serve.accesslog import AccessLog
from leanserve.serve.app import Extras, LeanApp, build_app, run_app
from leanserve.serve.cache import CacheObserver
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.protocol.rest import error_response, json_response
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ServerConfig
from leanserve.serve.shadow import ShadowObserver

log = logging.getLogger(__name__)


@dataclass
class Server:
    """The parts of a running server, for tests and embedding."""

    config: ServerConfig
    registry: ModelRegistry
    plane: DataPlane
    metrics: ServerMetrics
    app: LeanApp
    monitor: Monitor
    guard: RolloutGuard
    shadow: ShadowObserver
    explanations: ExplanationService
    prediction_log: Any = None  # PredictionLog when monitoring is on
    feedback: Any = None  # FeedbackService when monitoring is on


def build_server(config: ServerConfig, access_log: AccessLog | None = None,
                 registry_factory: Callable[..., ModelRegistry] = ModelRegistry) -> Server:
    """Build (but do not start) the server for ``config``; models load when the app starts.

    ``registry_factory(repo, metrics, drain_timeout_s)`` makes the registry: another one runs the
    versions elsewhere (``ray_serve.RayModelRegistry``: as Ray Serve deployments)."""
    metrics = ServerMetrics()
    repo = Repository(config.repo, create=False)
    registry = registry_factory(repo, metrics, config.drain_timeout_s)
    live_stats = LiveStats()
    shadow = ShadowObserver(metrics)
    explanations = ExplanationService(repo, metrics.registry, config.explain)
    observers: list = [CacheObserver(), shadow, LiveStatsObserver(live_stats)]
    prediction_log = feedback = None
    extras = Extras(on_drain=[shadow.drain], on_close=[explanations.close])
    if config.monitor:
        from leanserve.monitor.feedback import FeedbackService, VersionLabels
        from leanserve.monitor.store import LogConfig, PredictionLog

        with _children_ignore_sigint():  # the writer process is started here
            prediction_log = PredictionLog(LogConfig(config.monitor_db or config.repo / ".monitor" / "predictions.db",
                                                     sample_rate=config.monitor_sample_rate))
        feedback = FeedbackService(prediction_log, metrics, labels=VersionLabels(repo))  # labels by name too
        observers.append(PredictionLogObserver(prediction_log))
        extras.on_scrape = [lambda: _log_gauges(metrics, prediction_log)]
        extras.on_close = [*extras.on_close, prediction_log.close]
    if config.explain.sample_interval_s is not None:
        observers.append(ImportanceSampler(explanations))
        extras.warm_ups = [explanations.warm_up]
    plane = DataPlane(registry, metrics, observers, explainer=explanations, feedback=feedback)
    signals = LiveSignals(live_stats, prediction_log, feedback.live_quality if feedback else None,
                          shadow.agreement, explanations.summary)
    guard = RolloutGuard(registry, signals, metrics, config.guard_interval_s)
    monitor = Monitor(registry, signals, metrics, config.guard_interval_s, slow_interval_s=10 * config.guard_interval_s)
    monitor.guard = guard  # the dashboard and `leanserve monitor` show its latest verdict and reason
    extras.background = [guard, monitor]
    if prediction_log is not None:  # the slow round reads the log: its process starts (and imports) with the server
        extras.warm_ups = [*extras.warm_ups, monitor.worker.warm_up]
    extras.routes = [*MonitoringApi(monitor).routes(), *_text_routes(plane)]
    core = build_app(config, registry, plane, metrics, extras, access_log)
    return Server(config, registry, plane, metrics, core.app, monitor, guard, shadow, explanations, prediction_log, feedback)


def run_server(config: ServerConfig, registry_factory: Callable[..., ModelRegistry] = ModelRegistry) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and exit. Raises InvalidInput, before
    anything starts, when the HTTP or gRPC port is taken."""
    check_ports(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("leanserve").setLevel(logging.INFO)
    server = build_server(config, registry_factory=registry_factory)
    if server.prediction_log is not None:
        with _children_ignore_sigint():  # the round worker is spawned now, from this (the main) thread
            server.monitor.worker.warm_up()
    run_app(config, server.app)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started inside the block ignore SIGINT. Ctrl-C reaches the terminal's whole process group;
    the server alone should act on it (and then close its helpers' pipes, which ends them), instead of a
    helper dying mid-write with a KeyboardInterrupt traceback. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_ports(config: ServerConfig) -> None:
    """Raise InvalidInput naming the port when the HTTP or gRPC port cannot be bound on ``config.host``
    (taken by another process, or both the same). Checked before start-up: uvicorn reports a taken
    port only after the server has said it is serving, and gRPC's bind fails inside the lifespan."""
    if config.grpc_port is not None and config.grpc_port == config.port and config.port != 0:
        raise InvalidInput(f"--port and --grpc-port are both {config.port}: give gRPC another port (or 0 to turn it off)")
    for what, flag, port in (("HTTP", "--port", config.port), ("gRPC", "--grpc-port", config.grpc_port)):
        if not port:  # None: gRPC off; 0: any free port
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(config.host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise InvalidInput(f"--host {config.host}: not an address of this machine ({exc.strerror})") from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as exc:
                raise InvalidInput(f"the {what} port {config.host}:{port} is not free ({exc.strerror}); "
                                   f"stop what holds it or choose another with {flag}") from None


def _text_routes(plane: DataPlane) -> list[Route]:
    """``/v1/embeddings`` and ``/v2/models/{m}/tokenize``, for text pipeline versions (the module is light:
    ``tokenizers`` is imported when a text pipeline loads)."""
    from leanserve.serve.protocol.openai import TextApi

    return TextApi(plane).routes()


def _log_gauges(metrics: ServerMetrics, prediction_log) -> None:
    for fate in ("written", "dropped", "failed"):
        metrics.log_samples.labels(fate).set(getattr(prediction_log.stats, fate))


class MonitoringApi:
    """``/dashboard``, ``/v2/monitor`` and ``/v2/monitor/models/{model}``: monitoring's own routes."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self._page = resources.files("leanserve.monitor").joinpath("dashboard/index.html").read_text(encoding="utf-8")

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self.dashboard, methods=["GET"]),
            Route("/v2/monitor", self.overview, methods=["GET"]),
            Route("/v2/monitor/models/{model}", self.model, methods=["GET"]),
        ]

    async def dashboard(self, request: Request) -> Response:
        return HTMLResponse(self._page)

    async def overview(self, request: Request) -> Response:
        return json_response(self.monitor.overview())

    async def model(self, request: Request) -> Response:
        try:
            return json_response(self.monitor.model_status(request.path_params["model"]))
        except LeanserveError as exc:
            return error_response(exc)
