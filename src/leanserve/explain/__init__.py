"""Attributions for predictions: why a served version answered as it did.

``shap_values`` computes SHAP's permutation, partition and kernel explanations over any engine, per
feature, per pixel or per token (``tokens`` hides a token model's tokens); ``gradients`` computes
Captum's Integrated Gradients over a version's PyTorch source; ``targets`` says what of a signature can
be explained and ``background`` what hidden features are replaced by (the version's reference data).
``service`` runs them on the server in a bounded pool of their own, adds them to responses and keeps
each version's live importance and its drift (``importance``). SHAP, Captum and PyTorch are imported
only when an explanation runs (``pip install 'leanserve[explain]'``).
"""

from leanserve.explain.methods import (
    INTEGRATED_GRADIENTS,
    KERNEL,
    METHODS,
    PARTITION,
    PERMUTATION,
    Attribution,
    ExplanationTimeout,
    ExplanationUnavailable,
)
from leanserve.explain.service import ATTRIBUTION_SUFFIX, ExplanationService
from leanserve.config import ExplainConfig

__all__ = [
    "ATTRIBUTION_SUFFIX", "INTEGRATED_GRADIENTS", "KERNEL", "METHODS", "PARTITION", "PERMUTATION", "Attribution",
    "ExplainConfig", "ExplanationService", "ExplanationTimeout", "ExplanationUnavailable",
]
