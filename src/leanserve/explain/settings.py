"""Typed settings of explanations: how the server explains (``ExplainConfig``) and one explanation to
run (``ExplainPlan``), parsed from request parameters and checked at the edge (``read_plan``), then
trusted by the service and its workers.

Request parameters (REST body ``parameters`` or gRPC request parameters):

- ``explain`` (true), ``explain_method``: ``permutation``, ``partition``, ``kernel`` (SHAP, any engine) or
  ``integrated_gradients`` (Captum, versions with a PyTorch source and a floating-point input); ``shap``
  is the permutation explainer. Default: Integrated Gradients where it applies, else permutation.
- ``explain_output``, ``explain_score`` (``column`` or ``similarity``, see ``methods.py``),
  ``explain_target`` (the class column; default the predicted one).
- ``explain_background``: ``reference`` (default: the version's reference data, see ``background.py``)
  or ``zeros``; ``explain_mask_token``: for token models, the id that replaces a hidden token.
- ``explain_timeout_ms``, ``explain_permutations`` (the permutation explainer's rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leanserve.artifact import Signature
from leanserve.config import ExplainConfig
from leanserve.errors import InvalidInput
from leanserve.explain.background import BACKGROUNDS, REFERENCE
from leanserve.explain.methods import (
    ALIASES,
    COLUMN,
    INTEGRATED_GRADIENTS,
    METHODS,
    SCORES,
    SHAP_METHODS,
    SIMILARITY,
    ExplanationUnavailable,
)
from leanserve.explain.targets import Target, TokenInputs, explain_target
from leanserve.explain.tokens import mask_id_for


@dataclass(frozen=True)
class ExplainPlan:
    """One explanation to run, parsed and checked before inference: method, tensors, score, budget."""

    method: str
    target: Target
    column: int | None  # explain_target
    timeout_ms: float
    permutations: int | None
    score: str = COLUMN
    background: str = REFERENCE  # floating-point inputs
    mask_id: int | None = None  # token inputs: the id of hidden tokens; None: dropped from the attention mask
    origin: str = "request"  # or "sample" (live importance)


def read_plan(params: dict[str, Any], signature: Signature, config: ExplainConfig,
              default_method: Callable[[Target], str], text: TokenInputs | None = None) -> ExplainPlan:
    """The explanation ``params`` ask for on a version of this signature.

    ``default_method`` picks the method when none is asked for; ``text`` is the token inputs of a text
    pipeline's model (its BYTES input is then explained per token). Raises InvalidInput for a malformed or
    out-of-range parameter, ExplanationUnavailable when the model or the method cannot explain (the
    message names what is missing and what would work).
    """
    method = _optional(params, "explain_method", str)
    method = ALIASES.get(method, method)
    if method is not None and method not in METHODS:
        raise InvalidInput(f"explain_method must be one of {', '.join(METHODS)}, got {method!r}")
    score = _optional(params, "explain_score", str) or COLUMN
    if score not in SCORES:
        raise InvalidInput(f"explain_score must be one of {', '.join(SCORES)}, got {score!r}")
    target = explain_target(signature, _optional(params, "explain_output", str), score, text)
    method = method or default_method(target)
    if method == INTEGRATED_GRADIENTS and (target.tokens is not None or score != COLUMN):
        what = f"token ids ({target.input.name})" if target.tokens is not None else "the similarity score"
        raise ExplanationUnavailable(f"integrated_gradients cannot explain {what}: it integrates gradients of a column "
                                     f"along a floating-point input; use one of {', '.join(SHAP_METHODS)}")
    column = _optional(params, "explain_target", int)
    if column is not None and score == SIMILARITY:
        raise InvalidInput("explain_target picks a column, which explain_score similarity does not use")
    background = _optional(params, "explain_background", str) or REFERENCE
    if background not in BACKGROUNDS:
        raise InvalidInput(f"explain_background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
    requested_id = _optional(params, "explain_mask_token", int)
    if requested_id is not None and target.tokens is None:
        raise InvalidInput(f"explain_mask_token applies to token models; input {target.input.name!r} is "
                           f"{target.input.datatype}")
    mask_id = mask_id_for(target.tokens, requested_id) if target.tokens is not None else None
    timeout_ms = _optional(params, "explain_timeout_ms", (int, float)) or config.timeout_ms
    if not 0 < timeout_ms <= config.timeout_ms:
        raise InvalidInput(f"explain_timeout_ms must be in (0, {config.timeout_ms:g}], got {timeout_ms}")
    permutations = _optional(params, "explain_permutations", int)
    if permutations is not None and not 1 <= permutations <= config.max_permutations:
        raise InvalidInput(f"explain_permutations must be in [1, {config.max_permutations}], got {permutations}")
    return ExplainPlan(method, target, column, float(timeout_ms), permutations, score, background, mask_id)


def _optional(params: dict[str, Any], name: str, kind):
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInput(f"{name} has the wrong type: {value!r}")
    return value
