"""What every ONNX-to-ONNX pass takes and returns: the calibration context and a result with notes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from leanserve.artifact import Signature


@dataclass(frozen=True)
class PassContext:
    """What passes may need besides the model: its signature, calibration rows, nodes to keep in float."""

    signature: Signature
    calibration: Mapping[str, np.ndarray] | None = None
    exclude_nodes: Sequence[str] = ()
    calibration_rows: int = 256
    calibration_batch: int = 16


@dataclass
class StepResult:
    """What a pass did, in words a user can read in the report."""

    notes: list[str] = field(default_factory=list)
