"""Checks before a derived version (optimize, edge, learn, federate, mitigate) is registered.

A derived version is judged against its parent on the held-out figure its command already measured.
Worse than the parent beyond the user's budget (or worse at all, where the command takes no budget) is
refused with ``WorseThanParent``, naming both figures; ``force`` registers it anyway, with a warning.
A collapsed model (non-finite weights, a constant predictor, held-out accuracy at or below chance) is
refused with ``Collapsed`` by the learners whatever ``force`` says: it is broken, not a trade-off.

    check_not_worse(HeldOut("top1", parent=0.97, derived=0.90, allowed_drop=0.005), force=args.force)
    check_not_collapsed(held_out_accuracy=0.1, classes=10, predictions=p, weights=model.state_dict().values())
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from leanserve.errors import LeanserveError

log = logging.getLogger(__name__)
_TOLERANCE = 1e-12  # figures equal up to rounding are not worse


class WorseThanParent(LeanserveError):
    """The derived version measures worse than its parent on held-out data; ``force`` registers it anyway."""


class Collapsed(LeanserveError):
    """The learnt model is broken (non-finite weights, one class for every row, accuracy at chance); never registered."""


@dataclass(frozen=True)
class HeldOut:
    """The parent's and the derived version's figure on the same held-out rows.

    ``allowed_drop`` is the user's budget in the metric's units (None: the command takes no budget, so
    any drop is worse). ``higher_is_better`` is False for errors and gaps (mse, a fairness gap)."""

    metric: str
    parent: float
    derived: float
    allowed_drop: float | None = None
    higher_is_better: bool = True

    @property
    def drop(self) -> float:
        """How much worse the derived version is (positive = worse); infinite when it is not a number."""
        if math.isnan(self.derived):
            return math.inf
        return self.parent - self.derived if self.higher_is_better else self.derived - self.parent

    @property
    def worse(self) -> bool:
        return self.drop > (self.allowed_drop or 0.0) + _TOLERANCE

    def describe(self) -> str:
        """e.g. ``held-out top1 0.9000 against 0.9700 for the parent (drop 0.0700; budget 0.0050)``."""
        budget = "no budget given" if self.allowed_drop is None else f"budget {self.allowed_drop:.4f}"
        return (f"held-out {self.metric} {self.derived:.4f} against {self.parent:.4f} for the parent "
                f"({'drop' if self.higher_is_better else 'rise'} {abs(self.drop):.4f}; {budget})")


def check_not_worse(figure: HeldOut | None, force: bool = False, what: str = "the new version") -> str | None:
    """Refuse a derived version worse than its parent: raises WorseThanParent when ``figure`` is worse and
    not ``force``; with ``force`` logs a warning and returns it. Returns None when it is not worse, or when
    nothing was measured (``figure`` None)."""
    if figure is None or not figure.worse:
        return None
    if not force:
        raise WorseThanParent(f"{what} is worse than its parent: {figure.describe()}; nothing registered "
                              "(--force registers it anyway)")
    warning = f"{what} is worse than its parent: {figure.describe()}; registered anyway (--force)"
    log.warning(warning)
    return warning


def collapse_reason(held_out_accuracy: float | None = None, classes: int | None = None,
                    predictions: np.ndarray | None = None, weights: Iterable | None = None) -> str | None:
    """Why a learnt classifier counts as collapsed, or None: a weight that is not finite, the same class
    predicted for every row of ``predictions`` (with more than one row), or ``held_out_accuracy`` at or
    below chance (1 / ``classes``). ``weights`` are arrays or tensors (e.g. ``state_dict().values()``)."""
    for tensor in weights or ():
        values = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return "its weights hold values that are not finite (NaN or infinity)"
    if predictions is not None:
        labels = np.asarray(predictions).reshape(-1)
        if labels.size > 1 and np.unique(labels).size == 1:
            return f"it predicts class {labels[0]} for all {labels.size} held-out rows"
    if held_out_accuracy is not None and classes and classes > 1:
        if not math.isfinite(held_out_accuracy) or held_out_accuracy <= 1.0 / classes + _TOLERANCE:
            return (f"its held-out accuracy {held_out_accuracy:.4f} is at or below chance "
                    f"({1.0 / classes:.4f} for {classes} classes)")
    return None


def check_not_collapsed(what: str = "the learnt model", **evidence) -> None:
    """Raise Collapsed, saying why, when ``collapse_reason(**evidence)`` finds a collapse; ``--force`` does
    not apply."""
    reason = collapse_reason(**evidence)
    if reason:
        raise Collapsed(f"{what} collapsed: {reason}; nothing registered (--force does not register a collapse)")
