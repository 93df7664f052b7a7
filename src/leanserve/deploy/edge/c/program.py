"""The lowered program the C target runs: int8 buffers and the kernel calls (``Layer``) that read and write
them, in order (``Program``), and the fixed-point arithmetic of requantization that ONNX Runtime's
integer kernels use (``requant_scale``, ``quantize_multiplier``).

``lower.py`` builds a ``Program`` from a QDQ ONNX graph; ``arena.py`` and ``codegen.py`` turn it into C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from leanserve.errors import UnsupportedFormat


class UnsupportedOperator(UnsupportedFormat):
    """The graph holds an operator, or an operator in a form, that the C kernels do not implement."""


@dataclass(frozen=True)
class QParams:
    """An int8 tensor's quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class Buffer:
    """An int8 activation buffer in the scratch arena (``size`` bytes), or the caller's input."""

    name: str
    size: int


@dataclass(frozen=True)
class Layer:
    """One kernel call: ``kind`` names the kernel, ``inputs``/``output`` the buffers, ``params`` the
    scalar arguments and ``constants`` the arrays that go into the header (weights, biases, multipliers).
    ``output`` is None for the layers that write the caller's float output."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    output: str | None
    params: dict = field(default_factory=dict, hash=False)
    constants: dict = field(default_factory=dict, hash=False, repr=False)
    macs: int = 0


@dataclass(frozen=True)
class Program:
    """The lowered model: its layers in order, the buffers they use, the input's quantization and the
    output's size. ``input_buffer`` holds the quantized input (what the int8-input entry point takes)."""

    layers: tuple[Layer, ...]
    buffers: dict[str, Buffer]
    input_name: str
    input_shape: tuple[int, ...]
    input_qparams: QParams
    input_buffer: str
    output_name: str
    output_shape: tuple[int, ...]
    output_qparams: QParams | None
    ops: tuple[str, ...]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        return sum(np.asarray(a).nbytes for layer in self.layers for a in layer.constants.values())


def requant_scale(in_scale: float, w_scale, out_scale: float):
    """in_scale * w_scale / out_scale in float32, the way ONNX Runtime's integer kernels compute it."""
    return np.float32(in_scale) * np.asarray(w_scale, np.float32) / np.float32(out_scale)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """A positive real multiplier as (Q31 integer, power-of-two exponent): real = m * 2**(e - 31), as
    TensorFlow Lite's QuantizeMultiplier (exact for a float32 ``real``). Multipliers too small to matter
    become (0, 0)."""
    if real <= 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)
    q = int(round(mantissa * (1 << 31)))
    if q == 1 << 31:
        q //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0
    if exponent > 30:
        raise UnsupportedOperator(f"a requantization multiplier of {real:g} is too large for 32-bit fixed point")
    return q, exponent
