"""The values a QDQ graph's tensors take while it is lowered (``lower.py``): constants, the float input,
int8 buffers seen as floats (``_View``), accumulating ops waiting for their output scale (``_Pending``)
and the float heads at the end (``_Final``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from leanserve.deploy.edge.c.program import QParams


@dataclass(frozen=True)
class _Const:
    array: np.ndarray  # float or integer initializer


@dataclass(frozen=True)
class _QConst:
    """DequantizeLinear of an initializer: the stored integers with their scale(s) and zero point(s)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass(frozen=True)
class _FloatInput:
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _View:
    """A float tensor that is exactly an int8 buffer dequantized."""

    buffer: str
    qp: QParams
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Pending:
    """An accumulating op whose output scale comes from the QuantizeLinear that follows."""

    kind: str  # conv, dense, add, avg_pool
    name: str
    inputs: tuple[_View, ...]
    shape: tuple[int, ...]
    params: dict
    weights: np.ndarray | None = None
    w_scale: np.ndarray | None = None
    bias: np.ndarray | None = None  # int32, in units of in_scale * w_scale
    low: float = -math.inf
    high: float = math.inf


@dataclass(frozen=True)
class _Final:
    """A float tensor computed from a view at the end of the graph: softmax or argmax of it."""

    op: str
    view: _View
    axis: int


def _clamp_range(low: float, high: float, qp: QParams) -> tuple[int, int]:
    """The int8 bounds of a float clamp [low, high] under ``qp`` (QuantizeLinear is monotonic, so clamping
    before or after quantizing gives the same values)."""
    lo = -128 if low == -math.inf else int(np.clip(np.rint(low / qp.scale) + qp.zero_point, -128, 127))
    hi = 127 if high == math.inf else int(np.clip(np.rint(high / qp.scale) + qp.zero_point, -128, 127))
    return lo, hi
