"""The data plane: health, metadata and inference, shared by the REST and gRPC transports.

Every transport decodes its wire format into an ``InferRequest`` and calls ``DataPlane.infer``; the
route, validation, cache, batching, shadow copy and metrics all happen here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from leanserve import __version__
from leanserve.errors import InvalidInput, LeanserveError, NotReady
from leanserve.explain.service import ExplanationService
from leanserve.explain.settings import ExplainConfig
from leanserve.monitor.live import LiveStats
from leanserve.monitor.quality import rolling_quality
from leanserve.monitor.store import PredictionLog
from leanserve.serve.cache import request_key
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.protocol.codec import InferRequest, InferResponse
from leanserve.serve.registry import LoadedVersion, ModelRegistry

log = logging.getLogger(__name__)
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "leanserve_admin", "leanserve_rollout"]


class DataPlane:
    """What the server does, independent of how requests arrive."""

    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics, prediction_log: PredictionLog | None = None,
                 explain: ExplainConfig | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.prediction_log = prediction_log
        self.explanations = ExplanationService(registry.repo, metrics.registry, explain)  # leanserve.explain
        self.live_stats = LiveStats()
        self.live_quality: dict[str, dict[int, float]] = {}  # model -> version -> accuracy (higher is better)
        self.draining = False
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_counts: dict[tuple[str, int, int], list[int]] = {}

    # --- health and metadata ----------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.registry.initial_load_done and not self.draining

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

    async def infer(self, name: str, version: str | None, request: InferRequest, protocol: str,
                    routing_key: str | None = None) -> InferResponse:
        """Route, validate, run (through cache and batcher) and answer one request.

        Raises InvalidInput, ModelNotFound, NotReady, Overloaded or RequestTimeout.
        """
        if self.draining:
            raise NotReady("the server is shutting down")
        key = routing_key if routing_key is not None else _param_str(request.parameters.get("routing_key"))
        handle, shadow = self.registry.route(name, version, key)
        explain = self.explanations.plan(handle, request)  # leanserve.explain: checked before inference runs
        metrics = handle.metrics
        outcome = "error"
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            outputs = await self._run(handle, request)
            outcome = "success"
        except InvalidInput:
            outcome = "invalid"
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.in_flight.dec()
            metrics.request_seconds.observe(elapsed)
            if outcome != "invalid":  # a client's bad input is not the version's error
                self.live_stats.record(name, handle.ref.version, elapsed * 1000, outcome == "success")
            self.metrics.requests.labels(name, str(handle.ref.version), protocol, outcome).inc()
        if shadow is not None:
            self._start_shadow(handle, shadow, request, outputs)
        if self.prediction_log is not None:
            self.prediction_log.record(name, handle.ref.version, request.id or "", request.inputs, outputs,
                                       (time.perf_counter() - started) * 1000, _param_str(request.parameters.get("group")))
        response = InferResponse(name, str(handle.ref.version), outputs, request.id)
        return await self.explanations.finish(explain, handle, request, response)  # leanserve.explain: attributions

    # --- delayed labels ---------------------------------------------------------------------------

    async def feedback(self, name: str, items: list[tuple[str, Any]]) -> dict[str, Any]:
        """Join true labels to logged requests by id; updates the live quality gauges of the model."""
        if self.prediction_log is None:
            raise NotReady("monitoring is off on this server (started with --no-monitor): feedback cannot be joined")
        self.registry.entry(name)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self.prediction_log.feedback, name, items)
        for outcome, count in (("accepted", result.accepted), ("unknown", len(result.unknown)), ("duplicate", len(result.duplicate))):
            self.metrics.feedback.labels(name, outcome).inc(count)
        if result.accepted:
            rows = await loop.run_in_executor(None, lambda: self.prediction_log.rows(name, limit=5000, labelled=True))
            for quality in rolling_quality(rows):
                self.metrics.quality.labels(name, str(quality.version), quality.metric).set(quality.value)
                score = quality.value if quality.metric == "accuracy" else -quality.value
                self.live_quality.setdefault(name, {})[quality.version] = score
                self.metrics.labelled.labels(name, str(quality.version)).set(quality.samples)
        if items and not result.accepted:
            raise InvalidInput(f"no label accepted: unknown request ids {result.unknown[:5]}, already labelled {result.duplicate[:5]}")
        return {"accepted": result.accepted, "unknown": result.unknown, "duplicate": result.duplicate}

    async def _run(self, handle: LoadedVersion, request: InferRequest) -> dict[str, np.ndarray]:
        inputs = request.inputs
        if handle.request_inputs is not None:  # e.g. a post-processed version's group, from a parameter
            rows = len(next(iter(inputs.values()))) if inputs and next(iter(inputs.values())).ndim else 1
            inputs = {**inputs, **handle.request_inputs(request.parameters, rows)}
        handle.signature.validate_inputs(inputs, allow_nonfinite=handle.config.allow_nonfinite)
        wanted = request.output_names
        if wanted:
            handle.signature.check_outputs(wanted)
        if handle.cache is None:
            outputs, _ = await handle.batcher.infer(inputs, wanted)
            return outputs
        cache_key = request_key(handle.ref.version, inputs, wanted)
        cached = handle.cache.get(cache_key)
        if cached is not None:
            handle.metrics.cache_hit.inc()
            return cached
        handle.metrics.cache_miss.inc()
        outputs, _ = await handle.batcher.infer(inputs, wanted)
        handle.cache.put(cache_key, outputs)
        return outputs

    # --- shadow -----------------------------------------------------------------------------------

    def _start_shadow(self, primary: LoadedVersion, shadow: LoadedVersion, request: InferRequest,
                      outputs: dict[str, np.ndarray]) -> None:
        if shadow.batcher.queue_depth >= shadow.batcher.config.max_queue_size // 2:
            return  # the shadow never competes with live traffic: skip when it is backed up
        task = asyncio.get_running_loop().create_task(self._shadow(primary, shadow, request, outputs))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, primary: LoadedVersion, shadow: LoadedVersion, request: InferRequest,
                      expected: dict[str, np.ndarray]) -> None:
        labels = (primary.ref.name, str(primary.ref.version), str(shadow.ref.version))
        try:
            shadow.signature.validate_inputs(request.inputs, allow_nonfinite=True)
            got, _ = await shadow.batcher.infer(request.inputs, list(expected))
            result = "agree" if outputs_agree(expected, got) else "disagree"
        except LeanserveError as exc:
            log.warning("shadow %s of %s failed: %s", labels[2], labels[0], exc)
            result = "error"
        self.metrics.shadow.labels(*labels, result).inc()
        counts = self._shadow_counts.setdefault((labels[0], primary.ref.version, shadow.ref.version), [0, 0])
        counts[0] += result == "agree"
        counts[1] += 1
        self.metrics.shadow_agreement.labels(*labels).set(counts[0] / counts[1])

    def shadow_agreement(self, name: str, version: int, shadow: int | None = None) -> float | None:
        """Share of shadow comparisons that agreed, for ``version`` as primary (and ``shadow`` as the
        shadow, when given); None when there were none."""
        counts = [c for (model, primary, other), c in self._shadow_counts.items()
                  if model == name and primary == version and (shadow is None or other == shadow)]
        total = sum(c[1] for c in counts)
        return sum(c[0] for c in counts) / total if total else None

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests and wait for shadow copies to finish."""
        self.draining = True
        if self._shadow_tasks:
            await asyncio.wait(self._shadow_tasks, timeout=timeout_s)
        self.explanations.close()  # leanserve.explain: admitted explanations still finish


def outputs_agree(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> bool:
    """Do two versions agree? Class scores: same top-1 per row; other outputs: close in value."""
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            return False
        if want.dtype.kind == "f" and want.ndim == 2 and want.shape[1] > 1:
            if not np.array_equal(want.argmax(axis=1), have.argmax(axis=1)):
                return False
        elif want.dtype.kind in "fc":
            if not np.allclose(want, have, rtol=1e-3, atol=1e-4):
                return False
        elif not np.array_equal(want, have):
            return False
    return True


def _param_str(value: Any) -> str | None:
    return None if value is None else str(value)
