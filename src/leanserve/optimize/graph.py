"""Graph passes: ONNX Runtime's offline graph optimization (constant folding, Conv+BatchNorm folding,
node fusions) and the transformer fusions (attention, layer norm, GELU) for BERT-like models."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from leanserve.errors import ModelLoadError
from leanserve.optimize.steps import PassContext, StepResult

log = logging.getLogger(__name__)
_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def optimize_graph(src: Path, dst: Path, ctx: PassContext, level: str = "extended") -> StepResult:
    """Save ONNX Runtime's optimized graph. ``basic`` folds constants and Conv+BatchNorm(+Relu);
    ``extended`` adds fusions. The layout-specific ``all`` level is not saved (not portable)."""
    if level not in _LEVELS:
        raise ModelLoadError(f"graph optimization level must be one of {', '.join(_LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return StepResult([f"ONNX Runtime graph optimization ({level}) saved"])


def fuse_transformer(src: Path, dst: Path, ctx: PassContext, num_heads: int = 0, hidden_size: int = 0) -> StepResult:
    """Apply ONNX Runtime's BERT fusions (Attention, SkipLayerNorm, BiasGelu...); reports what fused."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(dst))
    if not stats:
        return StepResult(["transformer fusions found nothing to fuse (not a BERT-like graph)"])
    notes = ["transformer fusions: " + ", ".join(f"{k}×{v}" for k, v in sorted(stats.items()))]
    if not any("Attention" in k for k in stats):
        notes.append("attention did not fuse: export with exporter='torchscript' and eager attention so "
                     "ONNX Runtime recognises the pattern (int8 attention is where most of the gain is)")
    return StepResult(notes)
