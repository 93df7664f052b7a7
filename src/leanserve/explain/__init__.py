"""Attributions for predictions: why a served version answered as it did.

``methods`` computes attributions (SHAP's permutation explainer over any engine, Captum's Integrated
Gradients over a version's PyTorch source); ``service`` runs them on the server in a bounded pool of
their own, adds them to responses and keeps each version's live importance and its drift
(``importance``). SHAP, Captum and PyTorch are imported only when an explanation runs
(``pip install 'leanserve[explain]'``).
"""

from leanserve.explain.methods import (
    INTEGRATED_GRADIENTS,
    METHODS,
    SHAP,
    Attribution,
    ExplanationTimeout,
    ExplanationUnavailable,
)
from leanserve.explain.service import ATTRIBUTION_SUFFIX, ExplanationService
from leanserve.explain.settings import ExplainConfig

__all__ = [
    "ATTRIBUTION_SUFFIX", "INTEGRATED_GRADIENTS", "METHODS", "SHAP", "Attribution", "ExplainConfig",
    "ExplanationService", "ExplanationTimeout", "ExplanationUnavailable",
]
