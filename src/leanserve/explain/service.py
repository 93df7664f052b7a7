"""Explanations on the server: a bounded pool beside inference, its metrics, and live importance.

Explanations are far costlier than the predictions they explain (hundreds of masked model runs, or a
backward pass per integration step), so they never share inference's queue or engine threads: they
run on their own threads (``ExplainConfig.workers``) with their own engine session per version
(``engine_threads`` threads), and at most ``workers + max_queue`` are admitted at once; the rest get
503 with Retry-After while inference keeps answering. Every explanation, and one request per version
every ``sample_interval_s`` when the pool is idle, feeds the version's global importance and its
attribution drift (``importance.py``), which the monitor shows.

The request parameters are read in ``settings.py``; the attribution output's parameters name the
method, the explained output and score, the background (and any fallback to zeros), and per row the
target column, the score and the baseline's score.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leanserve.errors import LeanserveError, Overloaded
from leanserve.explain.importance import VersionImportance
from leanserve.explain.methods import (
    INTEGRATED_GRADIENTS,
    PERMUTATION,
    SHAP_METHODS,
    SIMILARITY,
    Attribution,
    Deadline,
    ExplanationTimeout,
    ExplanationUnavailable,
)
from leanserve.explain.settings import ExplainConfig, ExplainPlan, read_plan
from leanserve.explain.targets import Target, TokenInputs
from leanserve.explain.tokens import check_lengths
from leanserve.explain.worker import VersionTools, prepare, run_plan

log = logging.getLogger(__name__)
ATTRIBUTION_SUFFIX = "__attribution"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ExplanationService:
    """Explains requests for the data plane: ``plan`` before inference, ``finish`` after it."""

    def __init__(self, repo, registry: CollectorRegistry, config: ExplainConfig | None = None) -> None:
        self.repo = repo
        self.config = config or ExplainConfig()
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="leanserve-explain")
        self._pending = 0
        self._tools: dict[tuple[str, int], VersionTools] = {}
        self._importance: dict[tuple[str, int], VersionImportance] = {}
        self._last_sample: dict[tuple[str, int], float] = {}
        self._text: dict[tuple[str, int], tuple[Any, TokenInputs | None]] = {}  # (artifact, its text's tokens)
        self._sample_not_before = 0.0  # the CPU budget of live sampling (see ``sample``)
        self.sample_cpu_s = 0.0  # CPU seconds spent on live samples
        self._tasks: set[asyncio.Task] = set()
        self._has_shap = importlib.util.find_spec("shap") is not None
        self._has_captum = importlib.util.find_spec("captum") is not None
        for methods, present in ((SHAP_METHODS, self._has_shap), ((INTEGRATED_GRADIENTS,), self._has_captum)):
            for method in methods if self.config.preload and present else ():
                self._pool.submit(prepare, method, self.config.engine_threads)
        r = registry
        self.m_explanations = Counter("leanserve_explanations", "Explanations by method, origin and outcome",
                                      ("model", "version", "method", "origin", "outcome"), registry=r)
        self.m_seconds = Histogram("leanserve_explanation_seconds", "Explanation time (queue + compute)",
                                   ("model", "version", "method"), buckets=_BUCKETS, registry=r)
        self.m_cpu = Counter("leanserve_explain_cpu_seconds", "CPU time of explanations (the explaining thread)",
                             ("origin",), registry=r)
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
        plan = self._plan(handle, params, request.inputs)
        if self._pending >= self.capacity:
            self.m_rejected.labels(handle.ref.name).inc()
            raise Overloaded(f"the explanation pool is full ({self._pending} running or queued); retry shortly, "
                             "or send the request without explain", self.config.retry_after_s)
        return plan

    async def finish(self, plan: ExplainPlan, handle, request, response):
        """The response with the attribution output ``plan`` asks for added (and, for text, the tokens
        the attributions belong to, as strings: ``<input>__tokens``)."""
        from leanserve.explain.text import TOKENS_SUFFIX

        result = await self.explain(handle, plan, request.inputs)
        name = plan.target.input.name + ATTRIBUTION_SUFFIX
        outputs = {name: result.values}
        described = _describe(plan, result)
        if result.tokens is not None:
            outputs[plan.target.input.name + TOKENS_SUFFIX] = result.tokens
            described["explained_tokens"] = plan.target.input.name + TOKENS_SUFFIX
        response.outputs = {**response.outputs, **outputs}
        response.output_parameters = {**response.output_parameters, name: described}
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
        spent: list[float] = []  # the thread's CPU seconds, whatever the outcome
        future = asyncio.get_running_loop().run_in_executor(self._pool, _run_timed, tools, plan, inputs, deadline,
                                                            self.config, spent)
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
            cpu_s = sum(spent)
            self.m_cpu.labels(plan.origin).inc(cpu_s)
            if plan.origin == "sample":
                self.sample_cpu_s += cpu_s
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
                plan.target.input.name, self.default_method(handle, plan.target), tuple(result.values.shape[1:]),
                self.config.reference_samples, self.config.window_samples)
        if result.method != importance.method or tuple(result.values.shape[1:]) != importance.row_shape:
            return  # shares from another method or input shape are not comparable
        drift = importance.add(result.values)
        if drift is not None:
            self.m_drift.labels(key[0], str(key[1])).set(drift)

    def sample(self, handle, request) -> None:
        """Maybe explain one row of this answered request in the background, for the version's live
        importance: at most once per ``sample_interval_s`` per version, only when the pool is idle
        (requests come first), and within ``sample_cpu_share``: a sample that ran T seconds holds the next one
        back T / share seconds. T is its wall time, not only its thread's CPU: while it runs it competes with
        requests for the cores and for the GIL, and under load it runs far longer than its thread is on a core
        (serve_bench: 0.8% of a core spent, 12% of the throughput lost, when CPU set the pace)."""
        interval = self.config.sample_interval_s
        if interval is None or self._pending:
            return
        key = (handle.ref.name, handle.ref.version)
        now = time.monotonic()
        if now < self._sample_not_before or now - self._last_sample.get(key, -1e18) < interval:
            return
        self._last_sample[key] = now
        try:
            plan = self._plan(handle, {}, request.inputs)
        except LeanserveError:
            return  # this version cannot be explained: nothing to sample
        inputs = {n: a[:1] for n, a in request.inputs.items()}  # one row bounds the cost
        # One antithetic permutation: still an unbiased estimate, and the importance averages many samples,
        # while a sample holds an explanation thread (500 evaluations of a sentence encoder took seconds,
        # and a request arriving meanwhile waited past its budget behind it).
        plan = replace(plan, origin="sample", permutations=1 if plan.method == PERMUTATION else None)
        self._sample_not_before = float("inf")  # one sample at a time; set when it ends
        task = asyncio.get_running_loop().create_task(self._sample(handle, plan, inputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def warm_up(self) -> None:
        """Import SHAP (and Captum) and compile SHAP's kernels now, blocking (seconds): live sampling runs
        this before the server reports ready, so the compilation never competes with requests."""
        for method in (PERMUTATION,) if self._has_shap else ():
            prepare(method, self.config.engine_threads)
        if self._has_captum:
            prepare(INTEGRATED_GRADIENTS, self.config.engine_threads)

    async def _sample(self, handle, plan: ExplainPlan, inputs: dict[str, np.ndarray]) -> None:
        spent, started = self.sample_cpu_s, time.monotonic()
        try:
            await self.explain(handle, plan, inputs)
        except (Overloaded, ExplanationTimeout):
            pass  # sampling yields to requests; the next interval tries again
        except LeanserveError as exc:
            log.warning("live explanation of %s failed: %s", handle.ref, exc)
        finally:
            cost = max(self.sample_cpu_s - spent, time.monotonic() - started)
            self._sample_not_before = time.monotonic() + cost / self.config.sample_cpu_share

    # --- helpers ----------------------------------------------------------------------------------

    def default_method(self, handle, target: Target) -> str:
        """Integrated Gradients where it applies (a PyTorch source, Captum, a floating-point input), else
        SHAP's permutation explainer."""
        from leanserve.torch_source import has_source

        if target.tokens is None and self._has_captum and has_source(handle.artifact):
            return INTEGRATED_GRADIENTS
        return PERMUTATION

    def _plan(self, handle, params: dict[str, Any], inputs: dict[str, np.ndarray]) -> ExplainPlan:
        plan = read_plan(params, handle.signature, self.config, lambda target: self.default_method(handle, target),
                         self._text_tokens(handle))
        self._check_method(handle, plan.method)
        if plan.target.tokens is not None:
            check_lengths(inputs, plan.target.tokens, self.config.max_tokens)
        return plan

    def _text_tokens(self, handle) -> TokenInputs | None:
        """The token inputs behind a text pipeline version's text (None for other versions), read from its
        ``pipeline.json`` once per loaded artifact."""
        from leanserve.explain.text import text_tokens

        key = (handle.ref.name, handle.ref.version)
        known = self._text.get(key)
        if known is None or known[0] is not handle.artifact:
            known = self._text[key] = (handle.artifact, text_tokens(handle.artifact))
        return known[1]

    def _check_method(self, handle, method: str) -> None:
        from leanserve.torch_source import has_source

        if method in SHAP_METHODS and not self._has_shap:
            raise ExplanationUnavailable("SHAP is not installed on this server (pip install 'leanserve[explain]')")
        if method == INTEGRATED_GRADIENTS:
            if not has_source(handle.artifact):
                raise ExplanationUnavailable(
                    f"integrated_gradients needs the PyTorch source of {handle.ref.name}:{handle.ref.version}, which it "
                    "does not have (register it with `leanserve export FILE.py:FUNC --name NAME`); use one of "
                    f"{', '.join(SHAP_METHODS)}")
            if not self._has_captum:
                raise ExplanationUnavailable("Captum is not installed on this server (pip install 'leanserve[explain]')")

    def _tools_for(self, handle) -> VersionTools:
        key = (handle.ref.name, handle.ref.version)
        tools = self._tools.get(key)
        if tools is None or tools.artifact is not handle.artifact:  # first use, or the version was reloaded
            tools = self._tools[key] = VersionTools(handle, self.repo, self.config)
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


class ImportanceSampler:
    """Live importance sampling as an observer on the request path: offers each answered request to
    ``ExplanationService.sample``, which decides in microseconds (composed only when sampling is on)."""

    def __init__(self, service: ExplanationService) -> None:
        self.service = service

    def after(self, call) -> None:
        if call.outcome == "success":
            self.service.sample(call.handle, call.request)


def _run_timed(tools: VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
               config: ExplainConfig, spent: list[float]) -> Attribution:
    """``run_plan``, appending the CPU seconds this thread spent on it to ``spent`` whatever the outcome
    (explanation sessions run on the calling thread, so this is the explanation's whole cost)."""
    started = time.thread_time()
    try:
        return run_plan(tools, plan, inputs, deadline, config)
    finally:
        spent.append(time.thread_time() - started)


def _describe(plan: ExplainPlan, result: Attribution) -> dict[str, Any]:
    """Parameters of the attribution output: per-row values as comma-separated strings (V2 parameters are scalars)."""
    described = {
        "explain_method": result.method,
        "explained_output": plan.target.output.name,
        "explained_score": "cosine_similarity" if result.score == SIMILARITY else "column",
        "explained_target": ",".join(str(int(t)) for t in result.targets),
        "output_value": ",".join(f"{v:.7g}" for v in result.outputs),
        "baseline_output": ",".join(f"{v:.7g}" for v in result.baseline_outputs),
        "completeness_gap": float(f"{result.completeness_gap:.6g}"),
        "explain_background": result.background,
    }
    if result.fallback:
        described["explain_background_fallback"] = result.fallback
    return described


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return value is True or (isinstance(value, int) and value == 1)
