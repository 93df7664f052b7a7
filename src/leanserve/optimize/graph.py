"""Graph passes: ONNX Runtime's offline graph optimization (constant folding, Conv+BatchNorm folding,
node fusions) and the transformer fusions (attention, layer norm, GELU) for BERT-like models."""

from __future__ import annotations

import logging
from collections import Counter
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


def detect_attention_shape(path: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) read off the graph: square MatMul weights give the hidden size, the
    constant last dimension of the attention Reshapes gives the head size. (0, 0) when unsure."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    squares = Counter(int(i.dims[0]) for i in graph.initializer if len(i.dims) == 2 and i.dims[0] == i.dims[1] and i.dims[0] >= 64)
    if not squares:
        return 0, 0
    hidden = squares.most_common(1)[0][0]
    producers = {out: node for node in graph.node for out in node.output}
    head_sizes: Counter[int] = Counter()
    for node in graph.node:
        shape = producers.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 4:
            continue
        last = producers.get(shape.input[3])
        if last is not None and last.op_type == "Constant":
            value = int(numpy_helper.to_array(last.attribute[0].t).reshape(-1)[0])
            if 0 < value < hidden and hidden % value == 0:
                head_sizes[value] += 1
    if not head_sizes:
        return 0, hidden
    return hidden // head_sizes.most_common(1)[0][0], hidden


def fuse_transformer(src: Path, dst: Path, ctx: PassContext, num_heads: int = 0, hidden_size: int = 0) -> StepResult:
    """Apply ONNX Runtime's BERT fusions (Attention, SkipLayerNorm, BiasGelu...); reports what fused.
    ``num_heads``/``hidden_size`` default to what ``detect_attention_shape`` reads off the graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    if not num_heads or not hidden_size:
        detected = detect_attention_shape(src)
        num_heads, hidden_size = num_heads or detected[0], hidden_size or detected[1]
    model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(dst))
    if not stats:
        return StepResult(["transformer fusions found nothing to fuse (not a BERT-like graph)"])
    notes = [f"transformer fusions (heads {num_heads}, hidden {hidden_size}): "
             + ", ".join(f"{k}×{v}" for k, v in sorted(stats.items()))]
    if not any("Attention" in k for k in stats):
        notes.append("attention did not fuse: export with exporter='torchscript' and eager attention so "
                     "ONNX Runtime recognises the pattern (int8 attention is where most of the gain is)")
    return StepResult(notes)
