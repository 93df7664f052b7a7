"""What runs on the explanation pool's threads: each version's tools (an engine session of its own, its
PyTorch source, its SHAP background), the one-off preparation of SHAP and Captum, and one explanation."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from leanserve.errors import InferenceError
from leanserve.explain.methods import (
    SHAP,
    Attribution,
    Deadline,
    Target,
    background_rows,
    integrated_gradients,
    shap_permutation,
)
from leanserve.explain.settings import ExplainConfig, ExplainPlan

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


def run_plan(tools: VersionTools, plan: ExplainPlan, inputs: dict[str, np.ndarray], deadline: Deadline,
         config: ExplainConfig) -> Attribution:
    """The explanation itself, on a pool thread."""
    deadline.check()  # it may have waited in the queue past its budget
    deadline = deadline.extended(prepare(plan.method, config.engine_threads))  # once per process, not the request's
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


def prepare(method: str, threads: int = 1) -> float:
    """Import the method's library and, for SHAP, compile its Numba kernels on a toy problem; returns the
    seconds it took (0 once done in this process). Both take seconds, once per process. For Integrated
    Gradients, PyTorch's process-wide intra-op threads become ``threads`` (0: left as they are)."""
    with _prepare_lock:
        if method in _prepared:
            return 0.0
        started = time.monotonic()
        if method == SHAP:
            toy = np.array([[1.0, 2.0]])
            shap_permutation(lambda rows: rows.sum(axis=1), toy, np.zeros((1, 2)), Deadline.after(600_000, "warm-up"))
        else:
            importlib.import_module("captum.attr")
            if threads:
                import torch

                # PyTorch's intra-op threads are process-wide; on a busy CPU the default (all cores) was 15x
                # slower than one thread here (IG on the digits CNN: 480 ms against 32 ms, 2 cores)
                log.info("explanations: PyTorch intra-op threads set to %d (process-wide)", threads)
                torch.set_num_threads(threads)
        _prepared.add(method)
        return time.monotonic() - started
