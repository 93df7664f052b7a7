"""The data plane: health, metadata and inference, shared by the REST and gRPC transports.

Every transport routes with ``DataPlane.route``, decodes its wire format against the routed version's
signature into an ``InferRequest``, and calls ``DataPlane.infer``. The core routes, validates, runs and
answers; optional features (cache, shadow, live statistics, prediction log, explanations) are observers
handed in when the server is composed (``leanserve.server``), so what is off is not on the request path.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from leanserve import __version__
from leanserve.errors import InvalidInput, NotReady
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.observers import INVALID, SUCCESS, Call, hooks
from leanserve.serve.protocol.codec import InferRequest, InferResponse
from leanserve.serve.loading import LoadedVersion
from leanserve.serve.registry import ModelRegistry

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "leanserve_admin", "leanserve_rollout"]
# Delayed labels: (model, [(request id, label)]) -> {"accepted": n, "unknown": [...], "duplicate": [...]}
FeedbackHandler = Callable[[str, list[tuple[str, Any]]], Awaitable[dict[str, Any]]]


class Explainer(Protocol):
    """Explanations of requests that ask for one (``leanserve.explain``), by shape."""

    def plan(self, handle: LoadedVersion, request: InferRequest) -> Any: ...

    async def finish(self, plan: Any, handle: LoadedVersion, request: InferRequest,
                     response: InferResponse) -> InferResponse: ...


@dataclass(frozen=True, slots=True)
class Routed:
    """The version that answers a request, and the shadow version that gets a copy (if any)."""

    handle: LoadedVersion
    shadow: LoadedVersion | None = None


class DataPlane:
    """What the server does, independent of how requests arrive."""

    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics, observers: list | None = None,
                 explainer: Explainer | None = None, feedback: FeedbackHandler | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.explainer = explainer
        self.feedback_handler = feedback
        self.observers = tuple(observers or ())  # what watches each request, in the order it runs
        self._before, self._after = hooks(list(self.observers))
        self.draining = False

    # --- health and metadata ----------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.registry.ready() and not self.draining

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "leanserve", "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.registry.route(name, version)
        except NotReady:
            return False
        return True

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata: name, loaded versions, platform and tensor specs."""
        handle, _ = self.registry.route(name, version)
        entry = self.registry.entry(name)
        sig = handle.signature
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": f"{handle.artifact.manifest.format}_{handle.artifact.manifest.default_runtime}",
            "inputs": [s.to_dict() for s in sig.inputs],
            "outputs": [s.to_dict() for s in sig.outputs],
        }

    # --- inference --------------------------------------------------------------------------------

    def route(self, name: str, version: str | None, routing_key: str | None = None) -> Routed:
        """The version that serves a request to ``name`` (``version`` pins one); transports route before
        decoding, so the body is checked against that version's signature. Raises ModelNotFound, NotReady."""
        if self.draining:
            raise NotReady("the server is shutting down")
        handle, shadow = self.registry.route(name, version, routing_key)
        return Routed(handle, shadow)

    async def infer(self, routed: Routed, request: InferRequest, protocol: str) -> InferResponse:
        """Validate, run (through the observers and the batcher) and answer one routed request.

        Raises InvalidInput, NotReady, Overloaded, RequestTimeout or InferenceError.
        """
        handle = routed.handle
        explain = None
        if self.explainer is not None and "explain" in request.parameters:
            explain = self.explainer.plan(handle, request)  # checked before inference runs
        call = Call(handle.ref.name, handle, request, protocol, time.perf_counter(), routed.shadow)
        metrics = handle.metrics
        metrics.in_flight_count[0] += 1
        try:
            call.outputs = await self._run(call)
            call.outcome = SUCCESS
        except InvalidInput:
            call.outcome = INVALID
            raise
        finally:
            call.elapsed_s = time.perf_counter() - call.started
            metrics.in_flight_count[0] -= 1
            metrics.request_seconds.observe(call.elapsed_s)
            metrics.outcome(protocol, call.outcome).inc()
            for after in self._after:
                after(call)
        response = InferResponse(handle.ref.name, str(handle.ref.version), call.outputs, request.id)
        if explain is not None:
            response = await self.explainer.finish(explain, handle, request, response)
        return response

    async def _run(self, call: Call) -> dict[str, np.ndarray]:
        handle, request = call.handle, call.request
        inputs = request.inputs
        if handle.request_inputs is not None:  # e.g. a post-processed version's group, from a parameter
            first = next(iter(inputs.values()), None)
            rows = len(first) if first is not None and first.ndim else 1
            inputs = {**inputs, **handle.request_inputs(request.parameters, rows)}
        handle.signature.validate_inputs(inputs, allow_nonfinite=handle.config.allow_nonfinite)
        wanted = request.output_names
        if wanted:
            handle.signature.check_outputs(wanted)
        call.inputs = inputs
        for before in self._before:
            answer = before(call)
            if answer is not None:
                return answer
        outputs, _ = await handle.batcher.infer(inputs, wanted)
        return outputs

    # --- delayed labels ---------------------------------------------------------------------------

    async def feedback(self, name: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """Join true labels to logged requests by id (``leanserve.monitor``'s feedback, when monitoring is on).

        Raises ModelNotFound, NotReady (monitoring off) or InvalidInput (no label accepted)."""
        self.registry.entry(name)
        if self.feedback_handler is None:
            raise NotReady("monitoring is off on this server (started with --no-monitor): feedback cannot be joined")
        return await self.feedback_handler(name, items)

    def drain(self) -> None:
        """Refuse new requests from now on (in-flight ones finish)."""
        self.draining = True

