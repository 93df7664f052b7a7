"""What runs on the explanation pool's threads: each version's tools (an engine session of its own, its
PyTorch source, its reference background), the one-off preparation of SHAP and Captum, and one explanation."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from leanserve.errors import InferenceError
from leanserve.explain.background import ZEROS, Background, reference_background, zeros
from leanserve.explain.gradients import integrated_gradients
from leanserve.explain.methods import ALIASES, INTEGRATED_GRADIENTS, PARTITION, SHAP_METHODS, Attribution, Deadline
from leanserve.explain.settings import ExplainConfig, ExplainPlan
from leanserve.explain.shap_values import explain_features, explain_tokens, grid_tree, shap_row
from leanserve.explain.tokens import masking_name, token_rows

log = logging.getLogger(__name__)


class VersionTools:
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
                # other engines' thread settings are process-wide (PyTorch); a pipeline passes them to its model
                if engine in ("onnxruntime", "pipeline"):
                    options = replace(options, intra_op_threads=self.config.engine_threads, inter_op_threads=1)
                self._session = load_session(self.artifact, options)
            return self._session

    def module(self):
        from leanserve.torch_source import load_source

        with self._lock:
            if self._module is None:
                self._module = load_source(self.artifact)
            return self._module

    def background(self, name: str, row_shape: tuple[int, ...]) -> Background:
        """Background rows for input ``name`` from the version's reference profile, or zeros saying why."""
        from leanserve.monitor.reference import load_reference

        with self._lock:
            if self._profile is False:
                self._profile = load_reference(self.repo, self.ref.name, self.ref.version)
        return reference_background(self._profile, name, row_shape, self.config.background_rows)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


def run_plan(tools: VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
             config: ExplainConfig) -> Attribution:
    """The explanation itself, on a pool thread."""
    deadline.check()  # it may have waited in the queue past its budget
    deadline = deadline.extended(prepare(plan.method, config.engine_threads))  # once per process, not the request's
    try:
        if plan.target.input.datatype == "BYTES":  # a text pipeline's text, explained per token
            from leanserve.explain.text import explain_text

            return explain_text(tools.session(), plan, inputs[plan.target.input.name], deadline, config)
        if plan.target.tokens is not None:
            return _explain_tokens(tools, plan, inputs, deadline, config)
        return _explain_features(tools, plan, inputs, deadline, config)
    except (RuntimeError, ValueError, TypeError) as exc:  # raised inside SHAP, Captum or PyTorch
        raise InferenceError(f"{plan.method} failed on {tools.ref}: {exc}") from exc


def _explain_features(tools: VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
                      config: ExplainConfig) -> Attribution:
    spec, output = plan.target.input, plan.target.output.name
    x = np.asarray(inputs[spec.name])
    row_shape = tuple(x.shape[1:])
    background = zeros(row_shape) if plan.background == ZEROS else tools.background(spec.name, row_shape)
    if plan.method == INTEGRATED_GRADIENTS:
        background = background.mean()
        result = integrated_gradients(tools.module(), x, background.rows, deadline,
                                      output_index=plan.target.output_index, target=plan.column, steps=config.ig_steps)
    else:
        session = tools.session()
        result = explain_features(plan.method, lambda batch: session.run({spec.name: batch}, [output])[output], x,
                                  background.rows, deadline, target=plan.column, score=plan.score,
                                  max_evals=config.shap_max_evals, permutations=plan.permutations)
    return replace(result, background=background.source, fallback=background.fallback)


def _explain_tokens(tools: VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
                    config: ExplainConfig) -> Attribution:
    output = plan.target.output.name
    session = tools.session()
    rows = token_rows(inputs, plan.target.tokens, plan.mask_id)
    result = explain_tokens(plan.method, lambda batch: session.run(batch, [output])[output], rows, deadline,
                            target=plan.column, score=plan.score, max_evals=config.shap_max_evals,
                            permutations=plan.permutations)
    return replace(result, background=masking_name(plan.mask_id))


_prepared: set[str] = set()
_prepare_lock = threading.Lock()


def prepare(method: str, threads: int = 1) -> float:
    """Import the method's library and, for SHAP, compile its Numba kernels on a toy problem; returns the
    seconds it took (0 once done in this process). Both take seconds, once per process. For Integrated
    Gradients, PyTorch's process-wide intra-op threads become ``threads`` (0: left as they are)."""
    method = ALIASES.get(method, method)
    with _prepare_lock:
        if method in _prepared:
            return 0.0
        started = time.monotonic()
        if method in SHAP_METHODS:
            toy = np.array([1.0, 2.0, 3.0])
            shap_row(method, lambda rows: rows.sum(axis=1), toy, np.zeros((1, 3)), Deadline.after(600_000, "warm-up"),
                     clustering=grid_tree((3,)) if method == PARTITION else None)
        elif method == INTEGRATED_GRADIENTS:
            importlib.import_module("captum.attr")
            if threads:
                import torch

                # PyTorch's intra-op threads are process-wide; on a busy CPU the default (all cores) was 15x
                # slower than one thread here (IG on the digits CNN: 480 ms against 32 ms, 2 cores)
                log.info("explanations: PyTorch intra-op threads set to %d (process-wide)", threads)
                torch.set_num_threads(threads)
        _prepared.add(method)
        return time.monotonic() - started
