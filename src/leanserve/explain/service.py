"""Explanations on the server: a bounded pool beside inference, its metrics, and live importance.

Explanations are far costlier than the predictions they explain (hundreds of masked model runs, or a
backward pass per integration step), so they never share inference's queue or engine threads: they
run on their own threads (``ExplainConfig.workers``) with their own engine session per version
(``engine_threads`` threads), and at most ``workers + max_queue`` are admitted at once; the rest get
503 with Retry-After while inference keeps answering. Every explanation, and one request per version
every ``sample_interval_s`` when the pool is idle, feeds the version's global importance and its
attribution drift (``importance.py``), which the monitor shows.

Request parameters (REST body ``parameters`` or gRPC request parameters): ``explain`` (true),
``explain_method`` (``shap`` or ``integrated_gradients``; default Integrated Gradients when the version
has a PyTorch source, else SHAP), ``explain_output``, ``explain_target`` (class column; default the
predicted one), ``explain_timeout_ms``, ``explain_permutations`` (SHAP).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leanserve.errors import InferenceError, InvalidInput, LeanserveError, Overloaded
from leanserve.explain.importance import VersionImportance
from leanserve.explain.methods import (
    INTEGRATED_GRADIENTS,
    METHODS,
    SHAP,
    Attribution,
    Deadline,
    ExplanationTimeout,
    ExplanationUnavailable,
    Target,
    background_rows,
    explain_target,
    integrated_gradients,
    shap_permutation,
)

log = logging.getLogger(__name__)
ATTRIBUTION_SUFFIX = "__attribution"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ExplainConfig:
    """How the server explains. Durations carry their unit in the name."""

    workers: int = 1  # explanation threads
    max_queue: int = 4  # explanations admitted beyond those running; more get 503 + Retry-After
    timeout_ms: float = 5000.0  # default and largest per-request budget (queue wait included)
    engine_threads: int = 1  # intra-op threads of the explanation session (ONNX Runtime versions)
    shap_max_evals: int = 500  # SHAP model evaluations per row when explain_permutations is not given
    max_permutations: int = 32
    ig_steps: int = 50
    background_rows: int = 32  # rows of the reference profile used as SHAP's background
    sample_interval_s: float | None = 10.0  # live importance: one request per version this often; None: off
    reference_samples: int = 20  # explanations that fix a version's reference importance
    window_samples: int = 50  # latest explanations compared with the reference
    drift_threshold: float = 0.2  # total variation distance above which attributions have drifted
    retry_after_s: float = 1.0
    preload: bool = False  # import SHAP/Captum and compile SHAP's kernels at start (seconds), not at the first explanation

    def __post_init__(self) -> None:
        for name in ("workers", "shap_max_evals", "max_permutations", "ig_steps", "background_rows",
                     "reference_samples", "window_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidInput(f"explain.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0 or self.engine_threads < 0 or self.timeout_ms <= 0:
            raise InvalidInput("explain.max_queue and explain.engine_threads must be >= 0 and explain.timeout_ms > 0")


@dataclass(frozen=True)
class ExplainPlan:
    """One explanation to run, parsed and checked before inference: method, tensors, budget."""

    method: str
    target: Target
    column: int | None  # explain_target
    timeout_ms: float
    permutations: int | None
    origin: str = "request"  # or "sample" (live importance)


class _VersionTools:
    """What explaining one loaded version needs, loaded on first use in the pool's threads."""

    def __init__(self, handle, repo, config: ExplainConfig) -> None:
        self.artifact = handle.artifact
        self.ref = handle.ref
        self.runtime = handle.config.runtime
        self.repo, self.config = repo, config
        self._lock = threading.Lock()
        self._session = self._module = None
        self._profile: Any = False  # False: not read yet; None: the version has none

    def session(self):
        from leanserve.runtime import load_session

        with self._lock:
            if self._session is None:
                options = self.runtime
                engine = options.engine or self.artifact.manifest.default_runtime
                if engine == "onnxruntime":  # other engines' thread settings are process-wide (PyTorch)
                    options = replace(options, intra_op_threads=self.config.engine_threads, inter_op_threads=1)
                self._session = load_session(self.artifact, options)
            return self._session

    def module(self):
        from leanserve.torch_source import load_source

        with self._lock:
            if self._module is None:
                self._module = load_source(self.artifact)
            return self._module

    def background(self, target: Target, row_shape: tuple[int, ...]) -> np.ndarray:
        from leanserve.monitor.reference import load_reference

        with self._lock:
            if self._profile is False:
                self._profile = load_reference(self.repo, self.ref.name, self.ref.version)
        return background_rows(self._profile, target, row_shape, self.config.background_rows)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


class ExplanationService:
    """Explains requests for the data plane: ``plan`` before inference, ``finish`` after it."""

    def __init__(self, repo, registry: CollectorRegistry, config: ExplainConfig | None = None) -> None:
        self.repo = repo
        self.config = config or ExplainConfig()
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="leanserve-explain")
        self._pending = 0
        self._tools: dict[tuple[str, int], _VersionTools] = {}
        self._importance: dict[tuple[str, int], VersionImportance] = {}
        self._last_sample: dict[tuple[str, int], float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._has_shap = importlib.util.find_spec("shap") is not None
        self._has_captum = importlib.util.find_spec("captum") is not None
        for method, present in ((SHAP, self._has_shap), (INTEGRATED_GRADIENTS, self._has_captum)):
            if self.config.preload and present:
                self._pool.submit(prepare, method)
        r = registry
        self.m_explanations = Counter("leanserve_explanations", "Explanations by method, origin and outcome",
                                      ("model", "version", "method", "origin", "outcome"), registry=r)
        self.m_seconds = Histogram("leanserve_explanation_seconds", "Explanation time (queue + compute)",
                                   ("model", "version", "method"), buckets=_BUCKETS, registry=r)
        self.m_pending = Gauge("leanserve_explain_pending", "Explanations admitted and not finished", registry=r)
        self.m_rejected = Counter("leanserve_explain_rejected", "Explanations refused because the pool was full",
                                  ("model",), registry=r)
        self.m_drift = Gauge("leanserve_attribution_drift", "Total variation distance of live attribution shares "
                             "from the version's reference", ("model", "version"), registry=r)

    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.max_queue

    @property
    def pending(self) -> int:
        return self._pending

    # --- the request path -------------------------------------------------------------------------

    def plan(self, handle, request) -> ExplainPlan | None:
        """The explanation a request asks for (None when it asks for none), checked against the version.

        Raises InvalidInput for bad parameters, ExplanationUnavailable when the version or method cannot
        explain, and Overloaded when the pool is full (before any inference runs).
        """
        params = request.parameters
        if not _truthy(params.get("explain")):
            return None
        plan = self._plan(handle, params)
        if self._pending >= self.capacity:
            self.m_rejected.labels(handle.ref.name).inc()
            raise Overloaded(f"the explanation pool is full ({self._pending} running or queued); retry shortly, "
                             "or send the request without explain", self.config.retry_after_s)
        return plan

    async def finish(self, plan: ExplainPlan | None, handle, request, response):
        """The response, with the attribution output added when ``plan`` asks for one; otherwise it may
        start a background explanation of this request for the version's live importance."""
        if plan is None:
            self._maybe_sample(handle, request)
            return response
        result = await self.explain(handle, plan, request.inputs)
        name = plan.target.input.name + ATTRIBUTION_SUFFIX
        response.outputs = {**response.outputs, name: result.values}
        response.output_parameters = {**response.output_parameters, name: _describe(plan, result)}
        return response

    async def explain(self, handle, plan: ExplainPlan, inputs: dict[str, np.ndarray]) -> Attribution:
        """Run ``plan`` on ``inputs`` in the pool within its budget; raises Overloaded, ExplanationTimeout,
        ExplanationUnavailable or InferenceError."""
        if self._pending >= self.capacity:
            self.m_rejected.labels(handle.ref.name).inc()
            raise Overloaded(f"the explanation pool is full ({self._pending} running or queued)", self.config.retry_after_s)
        labels = (handle.ref.name, str(handle.ref.version), plan.method)
        what = f"explanation of {handle.ref.name}:{handle.ref.version} by {plan.method}"
        deadline = Deadline.after(plan.timeout_ms, what)
        tools = self._tools_for(handle)
        started = time.perf_counter()
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._pool, _run, tools, plan, inputs, deadline, self.config)
        future.add_done_callback(self._release)
        outcome = "error"
        try:
            # no timer here: the thread checks the deadline between engine calls and stops itself, so a
            # slot is never taken by work nobody waits for
            result = await future
            outcome = "success"
        except ExplanationTimeout:
            outcome = "timeout"
            raise
        finally:
            self.m_explanations.labels(*labels, plan.origin, outcome).inc()
            self.m_seconds.labels(*labels).observe(time.perf_counter() - started)
        self._record(handle, plan, result)
        return result

    # --- live importance --------------------------------------------------------------------------

    def summary(self, name: str, version: int) -> dict[str, Any] | None:
        """Global importance and attribution drift of a version, for the monitor; None before any."""
        importance = self._importance.get((name, version))
        return None if importance is None else importance.summary(self.config.drift_threshold)

    def _record(self, handle, plan: ExplainPlan, result: Attribution) -> None:
        key = (handle.ref.name, handle.ref.version)
        importance = self._importance.get(key)
        if importance is None:
            importance = self._importance[key] = VersionImportance(
                plan.target.input.name, self.default_method(handle), tuple(result.values.shape[1:]),
                self.config.reference_samples, self.config.window_samples)
        if result.method != importance.method or tuple(result.values.shape[1:]) != importance.row_shape:
            return  # shares from another method or input shape are not comparable
        drift = importance.add(result.values)
        if drift is not None:
            self.m_drift.labels(key[0], str(key[1])).set(drift)

    def _maybe_sample(self, handle, request) -> None:
        interval = self.config.sample_interval_s
        if interval is None or self._pending:  # only an idle pool samples: requests come first
            return
        key = (handle.ref.name, handle.ref.version)
        now = time.monotonic()
        if now - self._last_sample.get(key, -1e18) < interval:
            return
        self._last_sample[key] = now
        try:
            plan = self._plan(handle, {})
        except LeanserveError:
            return  # this version cannot be explained: nothing to sample
        inputs = {n: a[:1] for n, a in request.inputs.items()}  # one row bounds the cost
        task = asyncio.get_running_loop().create_task(self._sample(handle, replace(plan, origin="sample"), inputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sample(self, handle, plan: ExplainPlan, inputs: dict[str, np.ndarray]) -> None:
        try:
            await self.explain(handle, plan, inputs)
        except (Overloaded, ExplanationTimeout):
            pass  # sampling yields to requests; the next interval tries again
        except LeanserveError as exc:
            log.warning("live explanation of %s failed: %s", handle.ref, exc)

    # --- helpers ----------------------------------------------------------------------------------

    def default_method(self, handle) -> str:
        from leanserve.torch_source import has_source

        return INTEGRATED_GRADIENTS if self._has_captum and has_source(handle.artifact) else SHAP

    def _plan(self, handle, params: dict[str, Any]) -> ExplainPlan:
        method = params.get("explain_method") or self.default_method(handle)
        if method not in METHODS:
            raise InvalidInput(f"explain_method must be one of {', '.join(METHODS)}, got {method!r}")
        target = explain_target(handle.signature, _optional(params, "explain_output", str))
        self._check_method(handle, method)
        timeout_ms = _optional(params, "explain_timeout_ms", (int, float)) or self.config.timeout_ms
        if not 0 < timeout_ms <= self.config.timeout_ms:
            raise InvalidInput(f"explain_timeout_ms must be in (0, {self.config.timeout_ms:g}], got {timeout_ms}")
        permutations = _optional(params, "explain_permutations", int)
        if permutations is not None and not 1 <= permutations <= self.config.max_permutations:
            raise InvalidInput(f"explain_permutations must be in [1, {self.config.max_permutations}], got {permutations}")
        return ExplainPlan(method, target, _optional(params, "explain_target", int), float(timeout_ms), permutations)

    def _check_method(self, handle, method: str) -> None:
        from leanserve.torch_source import has_source

        if method == SHAP and not self._has_shap:
            raise ExplanationUnavailable("SHAP is not installed on this server (pip install 'leanserve[explain]')")
        if method == INTEGRATED_GRADIENTS:
            if not has_source(handle.artifact):
                raise ExplanationUnavailable(
                    f"integrated_gradients needs the PyTorch source of {handle.ref.name}:{handle.ref.version}, which it "
                    "does not have (register it with `leanserve export FILE.py:FUNC --name NAME`); use explain_method shap")
            if not self._has_captum:
                raise ExplanationUnavailable("Captum is not installed on this server (pip install 'leanserve[explain]')")

    def _tools_for(self, handle) -> _VersionTools:
        key = (handle.ref.name, handle.ref.version)
        tools = self._tools.get(key)
        if tools is None or tools.artifact is not handle.artifact:  # first use, or the version was reloaded
            tools = self._tools[key] = _VersionTools(handle, self.repo, self.config)
        return tools

    def _admit(self) -> None:
        self._pending += 1
        self.m_pending.set(self._pending)

    def _release(self, future) -> None:
        # a done callback of an executor future runs on the event loop thread: no lock needed
        if not future.cancelled():
            future.exception()  # retrieved here: a failure after the caller timed out is not reported as lost
        self._pending -= 1
        self.m_pending.set(self._pending)

    def close(self) -> None:
        """Stop taking work; explanations already admitted still finish on the pool's threads."""
        self._pool.shutdown(wait=False)
        for tools in self._tools.values():
            tools.close()


def _run(tools: _VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
         config: ExplainConfig) -> Attribution:
    """The explanation itself, on a pool thread."""
    deadline.check()  # it may have waited in the queue past its budget
    deadline = deadline.extended(prepare(plan.method))  # a one-off server cost, not the request's
    spec, output = plan.target.input, plan.target.output.name
    x = np.asarray(inputs[spec.name])
    row_shape = tuple(x.shape[1:])
    try:
        if plan.method == SHAP:
            session = tools.session()
            background = tools.background(plan.target, row_shape)
            return shap_permutation(lambda batch: session.run({spec.name: batch}, [output])[output], x, background, deadline,
                                    target=plan.column, max_evals=config.shap_max_evals, permutations=plan.permutations)
        baseline = tools.background(plan.target, row_shape).mean(axis=0, keepdims=True)
        return integrated_gradients(tools.module(), x, baseline, deadline, output_index=plan.target.output_index,
                                    target=plan.column, steps=config.ig_steps)
    except (RuntimeError, ValueError, TypeError) as exc:  # raised inside SHAP, Captum or PyTorch
        raise InferenceError(f"{plan.method} failed on {tools.ref}: {exc}") from exc


_prepared: set[str] = set()
_prepare_lock = threading.Lock()


def prepare(method: str) -> float:
    """Import the method's library and, for SHAP, compile its Numba kernels on a toy problem; returns the
    seconds it took (0 once done in this process). Both take seconds, once per process."""
    with _prepare_lock:
        if method in _prepared:
            return 0.0
        started = time.monotonic()
        if method == SHAP:
            toy = np.array([[1.0, 2.0]])
            shap_permutation(lambda rows: rows.sum(axis=1), toy, np.zeros((1, 2)), Deadline.after(600_000, "warm-up"))
        else:
            importlib.import_module("captum.attr")
        _prepared.add(method)
        return time.monotonic() - started


def _describe(plan: ExplainPlan, result: Attribution) -> dict[str, Any]:
    """Parameters of the attribution output: per-row values as comma-separated strings (V2 parameters are scalars)."""
    return {
        "explain_method": result.method,
        "explained_output": plan.target.output.name,
        "explained_target": ",".join(str(int(t)) for t in result.targets),
        "output_value": ",".join(f"{v:.7g}" for v in result.outputs),
        "baseline_output": ",".join(f"{v:.7g}" for v in result.baseline_outputs),
        "completeness_gap": float(f"{result.completeness_gap:.6g}"),
    }


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return value is True or (isinstance(value, int) and value == 1)


def _optional(params: dict[str, Any], name: str, kind):
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInput(f"{name} has the wrong type: {value!r}")
    return value
