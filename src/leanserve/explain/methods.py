"""The vocabulary of explanations: method names, errors, the time budget, what an explanation returns,
and the scalar a row's explanation is of. The computations are in ``shap_values.py`` (SHAP's
permutation, partition and kernel explainers over any engine) and ``gradients.py`` (Captum's Integrated
Gradients over a version's PyTorch source). Pure numpy; nothing here imports SHAP, Captum or PyTorch.

Every method explains one scalar per row, its score (``explain_score``):

- ``column`` (default): column ``explain_target`` of the explained output, the predicted (largest) one by
  default, or the output itself when it has one value per row;
- ``similarity``: the cosine similarity of the output to the row's own output, for outputs whose columns
  are not classes (a sentence or image embedding). The row itself scores 1; attributions say which
  features keep the output where it is.

Every method promises additivity: a row's attributions sum to its score minus the baseline's score
(SHAP exactly, the baseline being the mean over the background; Integrated Gradients up to its
integration error, reported as ``completeness_gap``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from leanserve.errors import InvalidInput, RequestTimeout

PERMUTATION = "permutation"
PARTITION = "partition"
KERNEL = "kernel"
INTEGRATED_GRADIENTS = "integrated_gradients"
SHAP_METHODS = (PERMUTATION, PARTITION, KERNEL)
METHODS = (*SHAP_METHODS, INTEGRATED_GRADIENTS)
ALIASES = {"shap": PERMUTATION}  # the name the permutation explainer had before partition and kernel came

COLUMN = "column"
SIMILARITY = "similarity"
SCORES = (COLUMN, SIMILARITY)


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
                "ask for fewer explain_permutations, or send fewer rows or shorter sequences")


@dataclass(frozen=True)
class Attribution:
    """Attributions of a batch: ``values`` shaped like the explained input; per row the explained output
    column (``targets``, -1 when the output has one value per row or the score is a similarity), the
    row's score and the baseline's score. ``background`` names what hidden features were replaced by
    (``fallback``: why zeros stood in for the version's reference data, when they did). ``tokens``, for
    text, holds each attributed position's token as a string (``(rows, sequence)``, "" at padding)."""

    method: str
    values: np.ndarray
    targets: np.ndarray
    outputs: np.ndarray
    baseline_outputs: np.ndarray
    completeness_gap: float  # max over rows of |sum(values) - (output - baseline output)|
    score: str = COLUMN
    background: str = "zeros"
    fallback: str | None = None
    tokens: np.ndarray | None = None


def columns(outputs: np.ndarray) -> np.ndarray:
    """Outputs as float64 ``(rows, k)``: each row's values, flattened."""
    return np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)


def score_targets(outputs: np.ndarray, target: int | None, score: str = COLUMN) -> np.ndarray:
    """Per row, the output column to explain (``outputs`` as ``(rows, k)``): ``target`` when given, else
    the largest; -1 when the output has one value per row or ``score`` is a similarity."""
    if score == SIMILARITY or outputs.shape[1] == 1:
        return np.full(len(outputs), -1, dtype=np.int64)
    if target is not None:
        if not 0 <= target < outputs.shape[1]:
            raise InvalidInput(f"explain_target {target} is outside the output's {outputs.shape[1]} columns")
        return np.full(len(outputs), target, dtype=np.int64)
    return outputs.argmax(axis=1).astype(np.int64)


def scalar(outputs: np.ndarray, target: int, reference: np.ndarray | None = None) -> np.ndarray:
    """The explained score of each row of ``outputs`` (``(rows, k)``): column ``target`` (-1: the only one),
    or with ``reference`` (``(k,)``) the cosine similarity to it (0 where either vector is zero)."""
    if reference is None:
        return outputs[:, max(target, 0)]
    norms = np.linalg.norm(outputs, axis=1) * np.linalg.norm(reference)
    return np.divide(outputs @ reference, norms, out=np.zeros(len(outputs)), where=norms > 0)
