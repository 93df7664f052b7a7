"""HTTP routes of monitoring: the dashboard page and the JSON it reads."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from leanserve.errors import LeanserveError
from leanserve.monitor.status import Monitor
from leanserve.serve.protocol.rest import error_response, json_response


class MonitoringApi:
    """``/dashboard``, ``/v2/monitor`` and ``/v2/monitor/models/{model}``."""

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
