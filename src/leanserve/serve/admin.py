"""Admin API: load, unload, reload, traffic and rollback, behind a bearer token and loopback-only by default.

Traffic changes are written to the model's config in the repository first, so a restart keeps them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.errors import Forbidden, InvalidInput, LeanserveError, Unauthorized
from leanserve.traffic import read_events, rollback, set_traffic, start_rollout
from leanserve.repository import parse_version
from leanserve.serve.protocol.rest import error_response, json_response, read_body
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ADMIN_TOKEN_ENV, ServerConfig

log = logging.getLogger(__name__)


class AdminApi:
    """Routes under ``/v2/admin``; every call needs ``Authorization: Bearer <token>``."""

    def __init__(self, registry: ModelRegistry, config: ServerConfig) -> None:
        self.registry = registry
        self.config = config

    def routes(self) -> list[Route]:
        return [
            Route("/v2/admin/models", self._guard(self.status), methods=["GET"]),
            Route("/v2/admin/models/{model}/load", self._guard(self.load), methods=["POST"]),
            Route("/v2/admin/models/{model}/unload", self._guard(self.unload), methods=["POST"]),
            Route("/v2/admin/models/{model}/reload", self._guard(self.reload), methods=["POST"]),
            Route("/v2/admin/models/{model}/traffic", self._guard(self.traffic), methods=["POST"]),
            Route("/v2/admin/models/{model}/rollback", self._guard(self.rollback), methods=["POST"]),
            Route("/v2/admin/models/{model}/canary", self._guard(self.canary), methods=["POST"]),
        ]

    def _guard(self, handler):
        async def guarded(request: Request) -> Response:
            try:
                self._authorize(request)
                return json_response(await handler(request))
            except LeanserveError as exc:
                return error_response(exc)
        return guarded

    def _authorize(self, request: Request) -> None:
        if not self.config.admin_token:
            raise Forbidden(f"the admin API is disabled: start the server with {ADMIN_TOKEN_ENV} set")
        client = request.client.host if request.client else ""
        if not self.config.admin_allow_remote and not _is_loopback(client):
            raise Forbidden("the admin API is disabled for remote clients (loopback only)")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.config.admin_token}".encode()):
            raise Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")

    async def status(self, request: Request) -> dict[str, Any]:
        models = {}
        for name, entry in sorted(self.registry.models.items()):
            models[name] = {
                "loaded": sorted(entry.versions),
                "loading": sorted(entry.loading),
                "failed": {str(v): why for v, why in entry.failed.items()},
                "unloaded_by_admin": entry.unloaded_by_admin,
                "traffic": {"weights": dict(entry.config.traffic.weights), "shadow": entry.config.traffic.shadow},
                "rollout": {"canary": entry.config.rollout.canary, "primary": entry.config.rollout.primary,
                            "stage": entry.config.rollout.stage, "steps": list(entry.config.rollout.steps)},
                "rollout_events": read_events(self.registry.repo, name, 10),
            }
        return {"models": models}

    async def load(self, request: Request) -> dict[str, Any]:
        name = request.path_params["model"]
        await self.registry.admin_load(name)
        return await self._model_status(name)

    async def unload(self, request: Request) -> dict[str, Any]:
        name = request.path_params["model"]
        await self.registry.admin_unload(name)
        return await self._model_status(name)

    async def reload(self, request: Request) -> dict[str, Any]:
        name = request.path_params["model"]
        await self.registry.admin_reload(name)
        return await self._model_status(name)

    async def traffic(self, request: Request) -> dict[str, Any]:
        name = request.path_params["model"]
        doc = await self._json_body(request, "traffic")
        if not isinstance(doc, dict) or not set(doc) <= {"weights", "shadow"}:
            raise InvalidInput('traffic body must be {"weights": {"VERSION": WEIGHT, ...}, "shadow": VERSION or null}')
        available = set(self.registry.repo.versions(name))
        weights = doc.get("weights")
        if weights is not None:
            if not isinstance(weights, dict):
                raise InvalidInput("weights must be an object of version -> weight")
            missing = [v for v in weights if parse_version(v) not in available]
            if missing:
                raise InvalidInput(f"model {name!r} has no version {missing[0]}")
        shadow = doc.get("shadow", "keep")
        if shadow not in ("keep", None) and (not isinstance(shadow, int) or shadow not in available):
            raise InvalidInput(f"shadow must be an existing version of {name!r} or null")
        current = self.registry.repo.config(name)
        traffic = set_traffic(current.traffic, weights, shadow)
        self.registry.repo.update_config(name, traffic=traffic)
        await self.registry.sync_model(name)
        log.info("traffic of %s set to %s (shadow %s)", name, dict(traffic.weights), traffic.shadow)
        return await self._model_status(name)

    async def rollback(self, request: Request) -> dict[str, Any]:
        name = request.path_params["model"]
        current = self.registry.repo.config(name)
        traffic, target = rollback(current.traffic, self.registry.repo.versions(name))
        self.registry.repo.update_config(name, traffic=traffic)
        await self.registry.sync_model(name)
        log.warning("model %s rolled back: all traffic to version %d", name, target)
        return {"rolled_back_to": target, **await self._model_status(name)}

    async def canary(self, request: Request) -> dict[str, Any]:
        """Start a guarded rollout: {"version": N, "steps": [...], "step_interval_s": S, ...}."""
        name = request.path_params["model"]
        doc = await self._json_body(request, "canary")
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), int):
            raise InvalidInput('canary body must be {"version": N, ...rollout settings}')
        settings = {k: v for k, v in doc.items() if k != "version"}
        unknown = set(settings) - {"steps", "step_interval_s", "min_requests", "max_error_rate_increase",
                                   "max_p99_ratio", "p99_slack_ms", "max_quality_drop", "min_quality_samples",
                                   "min_shadow_agreement"}
        if unknown:
            raise InvalidInput(f"unknown rollout setting {sorted(unknown)[0]!r}")
        rollout = start_rollout(self.registry.repo, name, doc["version"], **settings)
        await self.registry.sync_model(name)
        return {"canary": rollout.canary, "primary": rollout.primary, "steps": list(rollout.steps),
                **await self._model_status(name)}

    async def _json_body(self, request: Request, what: str) -> Any:
        body = await read_body(request, 64 * 1024, self.config.body_timeout_s)
        try:
            return orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"{what} body is not valid JSON: {exc}") from None

    async def _model_status(self, name: str) -> dict[str, Any]:
        return (await self.status(None))["models"].get(name, {})  # type: ignore[arg-type]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")
