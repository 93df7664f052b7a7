"""Admin API: load, unload, reload, traffic and rollback, behind a bearer token and loopback-only by default.

Traffic changes are written to the model's config in the repository first, so a restart keeps them.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from leanserve.config import RolloutConfig
from leanserve.errors import Forbidden, InvalidInput, LeanserveError, Unauthorized
from leanserve.traffic import read_events, rollback, set_traffic, start_rollout
from leanserve.repository import parse_version
from leanserve.serve.protocol.rest import error_response, json_response, read_body
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ADMIN_TOKEN_ENV, ServerConfig

log = logging.getLogger(__name__)

# what a canary body may set: every rollout setting except the ones the rollout itself fills in
CANARY_SETTINGS = tuple(f.name for f in dataclasses.fields(RolloutConfig) if f.name not in ("canary", "primary", "stage"))


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
            Route("/v2/admin/models/{model}/promote", self._guard(self.promote), methods=["POST"]),
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
                "states": {str(v): state for v, state in _states(self.registry.repo, name).items()},
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
                raise InvalidInput("weights: expected an object of version -> weight")
            for version, weight in weights.items():
                if parse_version(version) not in available:
                    raise InvalidInput(f"weights: model {name!r} has no version {version}")
                if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                    raise InvalidInput(f"weights: the weight of version {version} must be an integer >= 0, got {weight!r}")
        shadow = doc.get("shadow", "keep")
        if shadow is not None and "shadow" in doc and (isinstance(shadow, bool) or not isinstance(shadow, int)
                                                       or shadow not in available):
            raise InvalidInput(f"shadow: expected an existing version of {name!r} (an integer) or null, got {shadow!r}")
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
        if not isinstance(doc, dict):
            raise InvalidInput('canary body must be {"version": N, ...rollout settings}')
        version = _version_field(doc)
        settings = {k: v for k, v in doc.items() if k != "version"}
        unknown = sorted(set(settings) - set(CANARY_SETTINGS))
        if unknown:
            raise InvalidInput(f"{unknown[0]}: unknown rollout setting; known: {', '.join(CANARY_SETTINGS)}")
        if "steps" in settings and not isinstance(settings["steps"], list):
            raise InvalidInput(f"steps: expected a list of increasing percentages, got {settings['steps']!r}")
        # RolloutConfig checks each value's type and range and names the field (rollout.FIELD: ...)
        rollout = start_rollout(self.registry.repo, name, version, **settings)
        await self.registry.sync_model(name)
        return {"canary": rollout.canary, "primary": rollout.primary, "steps": list(rollout.steps),
                **await self._model_status(name)}

    async def promote(self, request: Request) -> dict[str, Any]:
        """All traffic to one version at once: {"version": N} (stops a running rollout)."""
        name = request.path_params["model"]
        doc = await self._json_body(request, "promote")
        if not isinstance(doc, dict) or set(doc) != {"version"}:
            raise InvalidInput('promote body must be {"version": N}')
        ref = self.registry.repo.promote(name, _version_field(doc))
        await self.registry.sync_model(name)
        log.warning("model %s: version %d promoted, all traffic to it", name, ref.version)
        return {"promoted": ref.version, **await self._model_status(name)}

    async def _json_body(self, request: Request, what: str) -> Any:
        body = await read_body(request, 64 * 1024, self.config.body_timeout_s)
        try:
            return orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"{what} body is not valid JSON: {exc}") from None

    async def _model_status(self, name: str) -> dict[str, Any]:
        return (await self.status(None))["models"].get(name, {})  # type: ignore[arg-type]


def _version_field(doc: dict[str, Any]) -> int:
    value = doc.get("version")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"version: expected a version number (an integer), got {value!r}")
    return parse_version(value)


def _states(repo, name: str) -> dict[int, str]:
    try:
        return repo.state(name)
    except LeanserveError:  # the model's folder went away between the poll and this call
        return {}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")
