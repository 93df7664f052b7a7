"""Lower an int8 QDQ ONNX graph (ONNX Runtime's static quantizer writes them) to a list of integer layers.

The QDQ graph says, with QuantizeLinear/DequantizeLinear pairs, where each float tensor is held as int8 and
at what scale; ONNX Runtime fuses ``DQ -> Conv -> Q`` into one integer kernel. Here every such pattern
becomes one ``Layer`` that reads and writes int8 buffers: float values that are a dequantized int8 buffer
(``_View``) flow through ReLU, max pooling and reshapes in the integer domain (all commute with a per-tensor
affine quantization), and an accumulating op (Conv, Gemm, MatMul, Add, average pooling) waits (``_Pending``) for the
QuantizeLinear that fixes its output scale, absorbing ReLU/Clip on the way as the output clamp.

Activations are kept as int8: an ONNX uint8 tensor with zero point z holds the same values as int8 with
zero point z - 128, so nothing is lost. Weights must be int8 with zero point 0 (the quantizer's
``WeightSymmetric``), one scale per output channel or one for the tensor.

This module walks the graph; ``operators.py`` lowers each operator, ``values.py`` holds the values the
tensors take meanwhile, and ``program.py`` the ``Program`` that comes out.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from leanserve.deploy.edge.c.operators import _Operators
from leanserve.deploy.edge.c.program import Buffer, Layer, Program, QParams, UnsupportedOperator
from leanserve.deploy.edge.c.values import _Const, _Final, _FloatInput, _View
from leanserve.errors import InvalidInput

SUPPORTED_OPS = ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool",
                 "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Identity", "Softmax", "ArgMax")


# --- lowering -------------------------------------------------------------------------------------

def lower(path: str | Path) -> Program:
    """Read the QDQ ONNX model at ``path`` and return its integer program. Raises UnsupportedOperator
    naming the first operator (or form of one) the C kernels do not run, with the supported list;
    InvalidInput when the graph has not one float input and one output."""
    import onnx

    model = onnx.load(str(path))
    return _Lowering(model).run()


class _Lowering(_Operators):
    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.env: dict[str, object] = {t.name: _Const(numpy_helper.to_array(t)) for t in self.graph.initializer}
        self.uses = Counter(name for node in self.graph.node for name in node.input)
        self.uses.update(o.name for o in self.graph.output)
        self.layers: list[Layer] = []
        self.buffers: dict[str, Buffer] = {}
        self.producer: dict[str, int] = {}  # buffer -> index of the layer that writes it
        self.input_qparams: QParams | None = None
        self.input_buffer = ""
        self.ops: list[str] = []

    def run(self) -> Program:
        inputs = [i for i in self.graph.input if i.name not in self.env]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise InvalidInput(f"the C target takes models with one input and one output; this one has "
                               f"{len(inputs)} input(s) and {len(self.graph.output)} output(s)")
        source = inputs[0]
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in source.type.tensor_type.shape.dim)
        self.env[source.name] = _FloatInput(source.name, shape)
        for node in self.graph.node:
            if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                raise UnsupportedOperator(
                    f"operator {node.op_type!r} (node {node.name or node.output[0]!r}) is not supported by the C target; "
                    f"supported: {', '.join(SUPPORTED_OPS)}")
            self.ops.append(node.op_type)
            getattr(self, f"_{node.op_type.lower()}")(node, _attributes(node))
        if self.input_qparams is None:
            raise UnsupportedOperator("the model's input is never quantized: the C target needs an int8 QDQ model "
                                      "(static int8 from leanserve's optimizer)")
        output = self.graph.output[0].name
        out_shape, out_qp = self._finish(output, self.env.get(output))
        return Program(tuple(self.layers), dict(self.buffers), source.name, shape, self.input_qparams,
                       self.input_buffer, output, out_shape, out_qp, tuple(sorted(set(self.ops))))

    # --- helpers --------------------------------------------------------------------------------

    def _value(self, node, index: int, *kinds):
        name = node.input[index] if index < len(node.input) else ""
        value = self.env.get(name) if name else None
        if kinds and not isinstance(value, kinds):
            got = type(value).__name__.lstrip("_") if value is not None else "nothing"
            want = " or ".join(k.__name__.lstrip("_") for k in kinds)
            raise UnsupportedOperator(f"{node.op_type} node {node.name or node.output[0]!r}: input {index} ({name!r}) "
                                      f"must be {want} for the C target, got {got} (is the model int8 QDQ?)")
        return value

    def _new_buffer(self, name: str, size: int) -> str:
        key = f"b{len(self.buffers)}"
        self.buffers[key] = Buffer(key, int(size))
        return key

    def _emit(self, layer: Layer) -> None:
        if layer.output is not None:
            self.producer[layer.output] = len(self.layers)
        self.layers.append(layer)

    def _fail(self, node, why: str):
        raise UnsupportedOperator(f"{node.op_type} node {node.name or node.output[0]!r}: {why}")

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, name: str, value) -> tuple[tuple[int, ...], QParams | None]:
        if isinstance(value, _View):
            n = int(np.prod(value.shape))
            self._emit(Layer("dequantize", "output", (value.buffer,), None,
                             {"n": n, "scale": value.qp.scale, "zero_point": value.qp.zero_point}))
            return value.shape, value.qp
        if isinstance(value, _Final):
            view, shape = value.view, value.view.shape
            if value.axis % len(shape) != len(shape) - 1:
                raise UnsupportedOperator(f"{value.op} over axis {value.axis}: only the last axis is supported")
            n = int(np.prod(shape))
            if value.op == "argmax":
                rows = n // shape[-1]
                self._emit(Layer("argmax", "output", (view.buffer,), None, {"rows": rows, "n": shape[-1]}))
                return (*shape[:-1],), None
            self._emit(Layer("dequantize", "output", (view.buffer,), None,
                             {"n": n, "scale": view.qp.scale, "zero_point": view.qp.zero_point}))
            self._emit(Layer("softmax", "softmax", (), None, {"rows": n // shape[-1], "n": shape[-1]}))
            return shape, view.qp
        raise UnsupportedOperator(
            f"output {name!r} is computed in float (not quantized); the C target needs every Conv/Gemm/MatMul/Add "
            "quantized to int8, with a DequantizeLinear (and optionally Softmax/ArgMax) at the end")


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
