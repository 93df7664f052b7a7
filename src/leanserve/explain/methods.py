"""Attribution methods: SHAP's permutation explainer over any engine, Captum's Integrated Gradients over
a version's PyTorch source. Pure computation on numpy arrays; the pool, metrics and routes are in
``service.py``.

Both methods explain one scalar per row: column ``target`` of the explained output (the predicted
class by default), or the output itself when it has one value per row. Both promise additivity: a
row's attributions sum to its output minus the baseline output (SHAP exactly, as the mean over the
background rows; Integrated Gradients up to its integration error, reported as ``completeness_gap``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from leanserve.artifact import Signature, TensorSpec
from leanserve.errors import InvalidInput, RequestTimeout

SHAP = "shap"
INTEGRATED_GRADIENTS = "integrated_gradients"
METHODS = (SHAP, INTEGRATED_GRADIENTS)
_FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
_MAX_ROWS_PER_RUN = 2048  # masked rows SHAP hands over at once
# Masked rows per engine call: about 32k input values. Cache-sized calls ran the digits CNN's 1088 masked
# rows in 34-40 ms against 52 ms in one call (ONNX Runtime, one thread); a small tabular row still goes
# in calls of a thousand rows, where per-call overhead would dominate.
_ENGINE_CALL_VALUES = 32_768


class ExplanationUnavailable(InvalidInput):
    """This version, or this method on it, cannot explain the request (HTTP 400, the message says why)."""


class ExplanationTimeout(RequestTimeout):
    """An explanation did not finish within its time budget (HTTP 504)."""


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` an explanation must finish by; ``check`` raises once it has passed."""

    at: float
    budget_ms: float
    what: str

    @classmethod
    def after(cls, budget_ms: float, what: str) -> Deadline:
        return cls(time.monotonic() + budget_ms / 1000, budget_ms, what)

    def extended(self, seconds: float) -> Deadline:
        return Deadline(self.at + seconds, self.budget_ms, self.what) if seconds else self

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise ExplanationTimeout(self.message())

    def message(self) -> str:
        return (f"{self.what} did not finish within its budget of {self.budget_ms:g} ms; raise explain_timeout_ms, "
                "ask for fewer explain_permutations, or send fewer rows")


@dataclass(frozen=True)
class Target:
    """What is explained: input ``input`` (attributions take its shape) for output ``output``."""

    input: TensorSpec
    output: TensorSpec
    output_index: int  # position of ``output`` among the signature's outputs (for PyTorch sources)


@dataclass(frozen=True)
class Attribution:
    """Attributions of a batch: ``values`` shaped like the input; per row the explained output column
    (``targets``, -1 when the output has one value per row), its value and the baseline's value."""

    method: str
    values: np.ndarray
    targets: np.ndarray
    outputs: np.ndarray
    baseline_outputs: np.ndarray
    completeness_gap: float  # max over rows of |sum(values) - (output - baseline output)|


def explain_target(signature: Signature, output: str | None = None) -> Target:
    """The input and output an explanation of this signature covers.

    Explainable: one floating-point input with a leading batch axis, and an output of shape
    ``[batch]`` or ``[batch, k]`` (``output`` names it; default the first). Raises
    ExplanationUnavailable saying which condition fails.
    """
    if len(signature.inputs) != 1:
        names = ", ".join(s.name for s in signature.inputs)
        raise ExplanationUnavailable(f"explanations need a model with one input tensor; this one has {len(signature.inputs)} ({names})")
    spec = signature.inputs[0]
    if spec.datatype not in _FLOAT_TYPES:
        raise ExplanationUnavailable(f"input {spec.name!r} is {spec.datatype}: attributions need a floating-point input "
                                     "(features, pixels or embeddings), not tokens or strings")
    if not spec.shape or spec.shape[0] != -1:
        raise ExplanationUnavailable(f"input {spec.name!r} has shape {list(spec.shape)}: explanations need a variable "
                                     "leading batch axis, because the explainer runs many masked copies at once")
    names = [s.name for s in signature.outputs]
    if output is not None and output not in names:
        raise InvalidInput(f"explain_output {output!r} is not an output of this model; outputs: {', '.join(names)}")
    index = names.index(output) if output is not None else 0
    out = signature.outputs[index]
    if out.datatype not in _FLOAT_TYPES or len(out.shape) not in (1, 2):
        raise ExplanationUnavailable(f"output {out.name!r} ({out.datatype} {list(out.shape)}) cannot be explained: "
                                     "explanations cover a floating-point output of shape [batch] or [batch, classes]")
    return Target(spec, out, index)


def predicted_columns(outputs: np.ndarray, target: int | None) -> np.ndarray:
    """Per row, the output column to explain: ``target`` when given, else the largest (-1: one value per row)."""
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        return np.full(len(outputs), -1, dtype=np.int64)
    if target is not None:
        if not 0 <= target < outputs.shape[1]:
            raise InvalidInput(f"explain_target {target} is outside the output's {outputs.shape[1]} columns")
        return np.full(len(outputs), target, dtype=np.int64)
    return outputs.argmax(axis=1).astype(np.int64)


def _columns(outputs: np.ndarray) -> np.ndarray:
    """Outputs as ``(rows, k)``: the explained output's columns."""
    return outputs.reshape(len(outputs), -1)


def _pick(columns: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return columns[np.arange(len(columns)), np.maximum(targets, 0)]


def background_rows(profile, target: Target, row_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """Rows that stand in for hidden features: from the version's reference profile when it kept
    whole rows of this input (tabular profiles keep a value sample per column, drawn from the same
    rows; categorical columns take their most frequent value), otherwise one row of zeros (images and
    other reduced profiles keep only projected rows)."""
    from leanserve.monitor.profile import CategoricalFeature, TabularProfile

    zeros = np.zeros((1, *row_shape), dtype=np.float64)
    if profile is None or target.input.name not in profile.names:
        return zeros
    tensor = profile.tensor(target.input.name)
    if not isinstance(tensor, TabularProfile) or tuple(tensor.row_shape) != tuple(row_shape):
        return zeros
    samples = [f.sample for f in tensor.features if not isinstance(f, CategoricalFeature)]
    count = min([len(s) for s in samples] or [1], default=1)
    count = max(1, min(count, max_rows))
    columns = []
    for feature in tensor.features:
        if isinstance(feature, CategoricalFeature):
            columns.append(np.full(count, feature.categories[int(np.argmax(feature.counts))], dtype=np.float64))
        else:
            columns.append(np.asarray(feature.sample[:count], dtype=np.float64))
    return np.stack(columns, axis=1).reshape(count, *row_shape)


# --- SHAP -------------------------------------------------------------------------------------------

def shap_permutation(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, background: np.ndarray,
                     deadline: Deadline, *, target: int | None = None, max_evals: int = 500,
                     permutations: int | None = None, seed: int = 0) -> Attribution:
    """SHAP values of each row of ``x`` by SHAP's permutation explainer (antithetic permutations).

    ``predict`` maps a batch shaped like ``x`` to the explained output (``(n,)`` or ``(n, k)``);
    ``background`` holds the rows whose values stand in for hidden features (``(b, *x.shape[1:])``).
    ``permutations`` defaults to what fits in ``max_evals`` model evaluations per row (at least one).
    Raises ExplanationTimeout when ``deadline`` passes.
    """
    import shap

    row_shape = x.shape[1:]
    features = math.prod(row_shape)

    per_call = min(_MAX_ROWS_PER_RUN, max(32, _ENGINE_CALL_VALUES // max(1, features)))

    def model(flat: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(flat), per_call):
            deadline.check()
            chunk = flat[start:start + per_call].reshape(-1, *row_shape).astype(x.dtype, copy=False)
            parts.append(_columns(predict(chunk)).astype(np.float64))
        return np.concatenate(parts)

    deadline.check()
    # SHAP sees float64 whatever the engine's dtype: its Numba kernels then compile once per process
    flat_x = x.reshape(len(x), -1).astype(np.float64)
    columns = model(flat_x)
    targets = predicted_columns(columns if columns.shape[1] > 1 else columns[:, 0], target)
    rounds = permutations or max(1, max_evals // (2 * features + 1))
    masker = shap.maskers.Independent(background.reshape(len(background), -1).astype(np.float64), max_samples=len(background))
    explainer = shap.explainers.Permutation(model, masker, seed=seed)
    result = explainer(flat_x, max_evals=rounds * (2 * features + 1),
                       batch_size=max(1, _MAX_ROWS_PER_RUN // len(background)), silent=True)
    values = np.asarray(result.values).reshape(len(x), features, -1)   # (rows, features, k)
    base = np.asarray(result.base_values).reshape(len(x), -1)           # (rows, k)
    rows = np.arange(len(x))
    column = np.maximum(targets, 0)
    picked = values[rows, :, column].reshape(x.shape)
    baseline = base[rows, column]
    outputs = _pick(columns, targets)
    gap = np.abs(picked.reshape(len(x), -1).sum(axis=1) - (outputs - baseline)).max()
    return Attribution(SHAP, picked.astype(np.float32), targets, outputs, baseline, float(gap))


# --- Integrated Gradients ---------------------------------------------------------------------------

def integrated_gradients(module, x: np.ndarray, baseline: np.ndarray, deadline: Deadline, *, output_index: int = 0,
                         target: int | None = None, steps: int = 50) -> Attribution:
    """Integrated Gradients (Captum) of each row of ``x`` through a PyTorch ``module``, from ``baseline``
    (one row, broadcast to every row of ``x``) in ``steps`` Gauss-Legendre steps.

    ``output_index`` picks the explained output when the module returns several. Raises
    ExplanationTimeout when ``deadline`` passes.
    """
    import torch
    from captum.attr import IntegratedGradients

    def forward(batch):
        deadline.check()
        out = module(batch)
        if isinstance(out, (tuple, list)):
            out = out[output_index]
        return out.reshape(len(out), -1)

    inputs = torch.tensor(x, dtype=torch.float32)  # a copy: request arrays may be read-only views of the body
    start = torch.tensor(np.broadcast_to(baseline, x.shape), dtype=torch.float32)
    deadline.check()
    with torch.no_grad():
        columns = forward(inputs).numpy().astype(np.float64)
        base_columns = forward(start).numpy().astype(np.float64)
    targets = predicted_columns(columns if columns.shape[1] > 1 else columns[:, 0], target)
    column = torch.from_numpy(np.maximum(targets, 0))
    values, delta = IntegratedGradients(forward).attribute(
        inputs, baselines=start, target=column, n_steps=steps, return_convergence_delta=True)
    return Attribution(INTEGRATED_GRADIENTS, values.detach().numpy().astype(np.float32), targets, _pick(columns, targets),
                       _pick(base_columns, targets), float(delta.abs().max()))
