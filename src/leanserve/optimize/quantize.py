"""Quantization passes on ONNX models with ONNX Runtime's quantizer: dynamic int8, static int8 (QDQ,
calibrated on user data), fp16/bf16 conversion, weight-only int4 for large MatMuls, and 4-bit rows for
large embedding tables.

Robust to the known traps: symbolic shape inference that fails (retried without it), graphs already
fused, and operators the quantizer does not handle (left in float and named in the notes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from leanserve.errors import InvalidInput
from leanserve.measure import saturating_int8
from leanserve.optimize.steps import PassContext, StepResult
from leanserve.runtime.onnxruntime import TRT_CALIBRATION_TABLE  # the engine owns the name it loads

log = logging.getLogger(__name__)
QUANTIZABLE = ("Conv", "MatMul", "Gemm", "ConvTranspose", "Attention")
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


def calibration_batch_size(rows: int, largest: int) -> int:
    """The largest batch size up to ``largest`` that divides ``rows``, so every batch has the same shape.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack each batch's activations with
    ``np.asarray``, which fails on a shorter last batch ("inhomogeneous shape"); equal batches that use
    every row avoid it without dropping any calibration data.
    """
    return next(size for size in range(min(largest, rows), 0, -1) if rows % size == 0)


class _Rows(CalibrationDataReader):
    """Feeds calibration rows to the quantizer in equal batches of at most ``ctx.calibration_batch`` rows."""

    def __init__(self, ctx: PassContext) -> None:
        if not ctx.calibration:
            raise InvalidInput("static quantization needs calibration data (--calib FILE.npz)")
        names = ctx.signature.input_names
        missing = [n for n in names if n not in ctx.calibration]
        if missing:
            raise InvalidInput(f"calibration data has no array for input {missing[0]!r}")
        rows = min(ctx.calibration_rows, len(ctx.calibration[names[0]]))
        if rows == 0:
            raise InvalidInput("calibration data has 0 rows; expected at least 1")
        self.batch = calibration_batch_size(rows, ctx.calibration_batch)
        self._batches = iter([
            {n: np.ascontiguousarray(ctx.calibration[n][i:i + self.batch]) for n in names}
            for i in range(0, rows, self.batch)
        ])

    def get_next(self):
        return next(self._batches, None)


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the nodes the int8 quantizers can convert (Conv, MatMul, Gemm...), in graph order."""
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in QUANTIZABLE]


def dynamic_int8(src: Path, dst: Path, ctx: PassContext, per_channel: bool = True) -> StepResult:
    """Weights int8 (per channel by default), activations quantized at run time."""
    quantize_dynamic(src, dst, per_channel=per_channel, weight_type=QuantType.QInt8,
                     nodes_to_exclude=list(ctx.exclude_nodes),
                     # DefaultTensorType: fused contrib ops (Attention...) defeat ONNX shape inference.
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return StepResult([f"dynamic int8 ({'per-channel' if per_channel else 'per-tensor'} weights)", *_float_notes(src, dst, ctx)])


# Only the compute-heavy ops: quantizing Add/Gather/Softmax costs accuracy, gains little.
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "ConvTranspose")


def static_int8(src: Path, dst: Path, ctx: PassContext, method: str = "minmax", per_channel: bool = True,
                preprocess: bool = True, op_types: Sequence[str] = STATIC_OP_TYPES,
                seven_bit_weights: bool | None = None) -> StepResult:
    """QDQ int8 (uint8 activations, int8 weights) calibrated on ``ctx.calibration`` with MinMax, Entropy or
    Percentile. ``preprocess=False`` when ``src`` already went through ``pre_process``; ``op_types`` are
    the operator types quantized (the C target adds Add: it has no float arithmetic to fall back on).
    Weights use 7 bits where ONNX Runtime's int8 products saturate on this CPU (``saturating_int8``),
    unless ``seven_bit_weights`` says otherwise (the C target's kernels never saturate)."""
    seven_bit_weights = saturating_int8() if seven_bit_weights is None else seven_bit_weights
    if method not in _METHODS:
        raise InvalidInput(f"calibration method must be one of {', '.join(_METHODS)}, got {method!r}")
    reader = _Rows(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, note = pre_process(src, Path(tmp) / "prepared.onnx") if preprocess else (src, "")
        # the histogram calibrators print their progress to stdout, into the user's command output
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(prepared, dst, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=_METHODS[method], nodes_to_exclude=list(ctx.exclude_nodes),
                            op_types_to_quantize=list(op_types), reduce_range=seven_bit_weights,
                            extra_options={"CalibPercentile": 99.99, "WeightSymmetric": True})
    return StepResult([f"static int8 QDQ, {method} calibration on {min(ctx.calibration_rows, _rows(ctx))} rows "
                       f"(batches of {reader.batch})" + (", 7-bit weights (this CPU's int8 products saturate)" if seven_bit_weights else ""), note,
                       *_float_notes(src, dst, ctx)])


def _rows(ctx: PassContext) -> int:
    return len(next(iter(ctx.calibration.values()))) if ctx.calibration else 0


def pre_process(src: Path, dst: Path) -> tuple[Path, str]:
    """ORT's recommended pre-processing; symbolic shape inference fails on some graphs, so retry without it."""
    for skip_symbolic in (False, True):
        try:
            # When symbolic shape inference gives up, ORT saves its partial model (plus a copy of every
            # weight, 90 MB for MiniLM) into the working directory and never deletes it: work in dst's
            # folder, a temporary one, instead of littering the user's.
            with contextlib.chdir(dst.parent):
                quant_pre_process(str(src.resolve()), str(dst.resolve()), skip_symbolic_shape=skip_symbolic)
            return dst, "pre-processed" + (" (symbolic shape inference failed; skipped)" if skip_symbolic else "")
        except Exception as exc:  # the pre-processor raises assorted types from shape inference
            log.info("quantization pre-processing failed (symbolic=%s): %s", not skip_symbolic, exc)
    return src, "pre-processing failed; quantized the model as it was"


def _float_notes(src: Path, dst: Path, ctx: PassContext) -> list[str]:
    """Which quantizable nodes stayed in float (excluded on purpose or not handled)."""
    before = Counter(n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type in QUANTIZABLE)
    after = onnx.load(str(dst), load_external_data=False).graph
    int_ops = Counter(n.op_type for n in after.node)
    notes = [f"quantizable ops in the source: {dict(before)}; int8 ops now: "
             f"{ {k: v for k, v in int_ops.items() if 'Integer' in k or k in ('QuantizeLinear', 'DequantizeLinear', 'DynamicQuantizeLinear')} }"]
    if ctx.exclude_nodes:
        notes.append(f"kept in float (most sensitive): {', '.join(ctx.exclude_nodes)}")
    return notes


def to_fp16(src: Path, dst: Path, ctx: PassContext, bf16: bool = False) -> StepResult:
    """Convert weights and compute to fp16 (inputs/outputs keep their types); for GPUs and NPUs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(ctx.exclude_nodes))
    # the converter appends the input casts after the nodes that read them; ONNX Runtime runs such a graph,
    # but the ONNX checker (and so Repository.add) refuses it until the nodes are sorted
    OnnxModel(converted).topological_sort(is_deterministic=True)
    onnx.save(converted, str(dst))
    # ONNX Runtime's CPU and CUDA kernels barely cover bfloat16 graphs; the engines that run bf16 well do
    # it from an fp32 graph themselves, so bf16 is an engine precision (runtime.precision=bf16), not a pass.
    note = " [bf16 requested: fp16 written; for bf16 serve the fp32 model with runtime.precision=bf16 on " \
           "OpenVINO or TensorRT]" if bf16 else ""
    return StepResult(["fp16 weights and compute (inputs/outputs kept fp32)" + note])


def weight_only_int4(src: Path, dst: Path, ctx: PassContext, block_size: int = 32) -> StepResult:
    """4-bit weights (blockwise, symmetric) for MatMuls with constant weights; activations stay float.
    Linear layers exported as Gemm (PyTorch's TorchScript exporter writes them so) become MatMul + Add
    first, since the 4-bit kernel is a MatMul."""
    count, rewritten = _matmul_nbits(src, dst, ctx, bits=4, block_size=block_size)
    notes = [f"weight-only int4 (block {block_size}) on {count} MatMul(s)"]
    if rewritten:
        notes.append(f"{rewritten} Gemm(s) with constant weights rewritten as MatMul + Add for the 4-bit kernel")
    return StepResult(notes)


def blockwise_int8(src: Path, dst: Path, ctx: PassContext, block_size: int = 128, attention: bool = True) -> StepResult:
    """int8 MatMuls whose activations are quantized per block of ``block_size`` values along the inner
    dimension, at run time, rather than one scale for the whole tensor as ``dynamic_int8`` does: ONNX
    Runtime's MatMulNBits with 8-bit symmetric weights and accuracy_level 4 (int8 compute). One outlier
    activation (a transformer's [CLS] and [SEP] rows carry them) then coarsens only its own block. With
    ``attention``, fused Attention nodes take dynamic int8 as well (no blockwise form exists for them).

    On MiniLM (selection sentences, not the ones text_bench reports): min cosine to fp32 0.9963 against
    0.9849 for dynamic int8 of the same fused graph, which is faster; see benchmarks/text_bench.py."""
    count, rewritten = _matmul_nbits(src, dst, ctx, bits=8, block_size=block_size, accuracy_level=4)
    notes = [f"blockwise int8 (block {block_size}, int8 activations per block) on {count} MatMul(s)"]
    if rewritten:
        notes.append(f"{rewritten} Gemm(s) with constant weights rewritten as MatMul + Add for the blockwise kernel")
    if attention and any(n.op_type == "Attention" for n in onnx.load(str(dst), load_external_data=False).graph.node):
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "blockwise.onnx"
            Path(dst).replace(staged)
            quantize_dynamic(staged, dst, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["Attention"],
                             nodes_to_exclude=list(ctx.exclude_nodes),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        attentions = sum(1 for n in onnx.load(str(dst), load_external_data=False).graph.node if n.op_type == "QAttention")
        notes.append(f"dynamic int8 on {attentions} fused Attention node(s)")
    return StepResult(notes)


def _matmul_nbits(src: Path, dst: Path, ctx: PassContext, bits: int, block_size: int,
                  accuracy_level: int | None = None) -> tuple[int, int]:
    """ONNX Runtime's MatMulNBits on the MatMuls with constant weights (Gemms rewritten first); returns
    (MatMulNBits nodes written, Gemms rewritten)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidInput(f"block_size must be a power of two of at least 16, got {block_size}")
    # its import sets the root logger to INFO when nothing has configured logging; it logs every node
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    rewritten = gemm_to_matmul(model, exclude=ctx.exclude_nodes)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(ctx.exclude_nodes))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    count = sum(1 for n in onnx.load(str(dst), load_external_data=False).graph.node if n.op_type == "MatMulNBits")
    return count, rewritten


EMBEDDING_MIN_VALUES = 1_000_000  # vocabulary tables; position and type tables are small and more sensitive


def int4_embeddings(src: Path, dst: Path, ctx: PassContext, block_size: int = 32) -> StepResult:
    """4-bit rows for Gathers from large constant tables (a transformer's vocabulary embedding, half of
    MiniLM's bytes): symmetric, one scale per ``block_size`` values of a row, as ONNX Runtime's
    GatherBlockQuantized (com.microsoft). Other Gathers and every other node are left as they are."""
    from onnx import helper, numpy_helper

    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidInput(f"int4_embeddings: block_size must be a power of two of at least 16, got {block_size}")
    model = onnx.load(str(src))
    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    nodes, quantized = [], []
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" and node.name not in ctx.exclude_nodes else None
        if table is None or not _large_table(table, node):
            nodes.append(node)
            continue
        packed, scales = _int4_rows(numpy_helper.to_array(table), block_size)
        graph.initializer.extend([numpy_helper.from_array(packed, f"{table.name}_int4"),
                                  numpy_helper.from_array(scales, f"{table.name}_scales")])
        nodes.append(helper.make_node("GatherBlockQuantized", [f"{table.name}_int4", node.input[1], f"{table.name}_scales"],
                                      list(node.output), name=f"{node.name}_int4", domain="com.microsoft",
                                      gather_axis=0, quantize_axis=1, block_size=block_size, bits=4))
        quantized.append(f"{table.name} {list(table.dims)}")
    _replace_nodes(graph, nodes)
    if quantized and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    if not quantized:
        return StepResult([f"int4 embeddings: no Gather from a constant table of {EMBEDDING_MIN_VALUES:,}+ values; unchanged"])
    return StepResult([f"int4 embeddings (block {block_size}, GatherBlockQuantized): {', '.join(quantized)}"])


def has_large_embedding(path: Path) -> bool:
    """Whether ``int4_embeddings`` would change the model at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    tables = {t.name: t for t in model.graph.initializer}
    return any(n.op_type == "Gather" and n.input[0] in tables and _large_table(tables[n.input[0]], n)
               for n in model.graph.node)


def _large_table(table: onnx.TensorProto, node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    # an even row length: two 4-bit values share a byte, so an odd one would gain a phantom column
    return (axis == 0 and table.data_type == onnx.TensorProto.FLOAT and len(table.dims) == 2
            and table.dims[1] % 2 == 0 and table.dims[0] * table.dims[1] >= EMBEDDING_MIN_VALUES)


def _int4_rows(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed, scales): two 4-bit values per byte, low nibble first, offset by the op's default zero point 8,
    and one fp32 scale per block. Written here rather than by ONNX Runtime's MatMulNBitsQuantizer, which
    can quantize Gathers too but stores INT4 tensors, a type the ORT format (edge artifacts) cannot hold."""
    rows, cols = table.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = table
    grouped = padded.reshape(rows, blocks, block_size)
    scales = np.abs(grouped).max(axis=2) / 7.0
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(grouped / scales[..., None]), -8, 7).astype(np.int16) + 8
    values = values.reshape(rows, blocks * block_size)[:, :cols].astype(np.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4), scales.astype(np.float32)


def gemm_to_matmul(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> int:
    """Rewrite, in place, each Gemm with a constant 2-D weight (alpha = beta = 1, A not transposed) as
    MatMul(A, B') + Add(C), B' being B transposed when transB is set. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in exclude or node.input[1] not in weights
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = node.name or f"gemm{count}"
        transposed = numpy_helper.from_array(weight, f"{node.input[1]}__matmul")
        graph.initializer.append(transposed)
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], transposed.name], [product], name=f"{name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}_Add"))
        count += 1
    if count:
        _replace_nodes(graph, nodes)
    return count




def write_trt_calibration(src: Path, folder: Path, ctx: PassContext, method: str = "minmax") -> list[Path]:
    """Calibrate a float model's activation ranges on ``ctx.calibration`` and write the table TensorRT
    uses for int8 (``runtime.precision=int8`` on a GPU machine). Runs on the CPU, so a version can carry
    its table to a GPU machine. Returns the files written (the flatbuffers table first)."""
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.quant_utils import write_calibration_table

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(Path(src), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_METHODS[method])
        calibrator.collect_data(_Rows(ctx))
        ranges = calibrator.compute_data()
    with contextlib.chdir(folder):
        write_calibration_table(dict(ranges.data if hasattr(ranges, "data") else ranges), dir=".")
    written = [folder / TRT_CALIBRATION_TABLE, folder / "calibration.cache", folder / "calibration.json"]
    return [path for path in written if path.is_file()]


def _replace_nodes(graph: onnx.GraphProto, nodes: list) -> None:
    """Give ``graph`` these nodes, and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
