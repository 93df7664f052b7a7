"""Post-training int8 with NNCF (the OpenVINO toolkit's quantizer), on ONNX models: the result is an ONNX
model with QuantizeLinear/DequantizeLinear pairs, which OpenVINO compiles to int8 kernels (and ONNX
Runtime can still run). NNCF is imported only inside the pass, so the recipes load without it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.optimize.quantize import QUANTIZABLE
from leanserve.optimize.steps import PassContext, StepResult

_PRESETS = ("performance", "mixed")


def nncf_int8(src: Path, dst: Path, ctx: PassContext, preset: str = "performance", subset_size: int = 300) -> StepResult:
    """Quantize ``src`` to int8 with ``nncf.quantize``, calibrated on up to ``subset_size`` rows of
    ``ctx.calibration`` (one row per calibration step), keeping ``ctx.exclude_nodes`` in float; write the
    QDQ ONNX model to ``dst``. ``preset`` "performance" quantizes activations symmetrically, "mixed"
    asymmetrically. Raises InvalidInput without usable calibration data or with a bad preset, and
    UnsupportedFormat when NNCF is not installed."""
    if preset not in _PRESETS:
        raise InvalidInput(f"NNCF preset must be one of {', '.join(_PRESETS)}, got {preset!r}")
    try:
        import nncf
    except ImportError as exc:
        raise UnsupportedFormat("the openvino_int8 pass needs NNCF; install it with: pip install 'leanserve[openvino]'") from exc
    rows = _calibration_rows(ctx, subset_size)
    model = onnx.load(str(src))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(_single_rows(ctx, rows)),
        preset=nncf.QuantizationPreset(preset),
        subset_size=rows,
        ignored_scope=nncf.IgnoredScope(names=list(ctx.exclude_nodes)) if ctx.exclude_nodes else None,
    )
    onnx.save(quantized, str(dst))
    return StepResult([f"NNCF int8 QDQ ({preset} preset) calibrated on {rows} rows", *_what_was_quantized(dst, ctx)])


def _calibration_rows(ctx: PassContext, subset_size: int) -> int:
    """How many calibration rows to use; InvalidInput when ``ctx`` has none for some input."""
    if not ctx.calibration:
        raise InvalidInput("NNCF quantization needs calibration data (--calib FILE.npz)")
    missing = [n for n in ctx.signature.input_names if n not in ctx.calibration]
    if missing:
        raise InvalidInput(f"calibration data has no array for input {missing[0]!r}")
    if subset_size < 1:
        raise InvalidInput(f"subset_size must be at least 1, got {subset_size}")
    return min(subset_size, len(ctx.calibration[ctx.signature.input_names[0]]))


def _single_rows(ctx: PassContext, rows: int) -> list[dict[str, np.ndarray]]:
    # One row per item: NNCF counts subset_size in items and aggregates statistics over them.
    names = ctx.signature.input_names
    return [{n: np.ascontiguousarray(ctx.calibration[n][i:i + 1]) for n in names} for i in range(rows)]


def _what_was_quantized(path: Path, ctx: PassContext) -> Iterator[str]:
    """Notes: which compute-heavy nodes now take int8 inputs, and which stayed in float."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    heavy = [n for n in graph.node if n.op_type in QUANTIZABLE]
    floats = [n.name for n in heavy if not any(i in dequantized for i in n.input)]
    yield f"int8: {len(heavy) - len(floats)} of {len(heavy)} Conv/MatMul/Gemm nodes"
    if floats:
        yield f"kept in float: {', '.join(floats)}" + (" (excluded on request)" if set(floats) <= set(ctx.exclude_nodes) else "")
