"""What hidden features are replaced by: the version's reference data (issue 5's profile stored beside the
version), or zeros when it has none that fit, with the reason named in the response.

- Tabular inputs: up to ``background_rows`` whole rows of the reference. Their profile keeps a value
  sample per column, drawn from the same rows, so sample ``i`` of each column is one reference row;
  categorical columns, kept as counts only, take their most frequent value.
- Images, embeddings and other wide inputs: the reference's mean row (the mean image). SHAP then says
  how this input differs from the average one; zeros (``explain_background`` ``zeros``) say what its
  non-zero pixels contribute, which is what "where is the ink" asks.

Integrated Gradients starts from the mean of these rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REFERENCE = "reference"
ZEROS = "zeros"
BACKGROUNDS = (REFERENCE, ZEROS)


@dataclass(frozen=True)
class Background:
    """Rows ``(b, *row_shape)`` standing in for hidden features, what they are (``source``) and, for zeros
    that stand in for the reference, why (``fallback``)."""

    rows: np.ndarray
    source: str
    fallback: str | None = None

    def mean(self) -> Background:
        """One row: the mean of these (Integrated Gradients' baseline)."""
        if len(self.rows) == 1:
            return self
        return Background(self.rows.mean(axis=0, keepdims=True), f"{self.source}_mean", self.fallback)


def zeros(row_shape: tuple[int, ...], fallback: str | None = None) -> Background:
    return Background(np.zeros((1, *row_shape), dtype=np.float64), ZEROS, fallback)


def reference_background(profile, name: str, row_shape: tuple[int, ...], max_rows: int) -> Background:
    """Background rows for input ``name`` from a version's reference ``profile`` (None: it has none)."""
    from leanserve.monitor.profile import ReducedProfile, TabularProfile

    if profile is None:
        return zeros(row_shape, "this version has no reference profile (leanserve profile MODEL --data FILE)")
    if name not in profile.names:
        return zeros(row_shape, f"the reference profile has no tensor {name!r}")
    tensor = profile.tensor(name)
    if tuple(tensor.row_shape) != tuple(row_shape):
        return zeros(row_shape, f"the reference rows of {name!r} have shape {list(tensor.row_shape)}, "
                                f"this input's {list(row_shape)}")
    if isinstance(tensor, TabularProfile):
        return _sample_rows(tensor, row_shape, max_rows)
    if isinstance(tensor, ReducedProfile) and len(tensor.mean) == math.prod(row_shape):
        return Background(np.asarray(tensor.mean, dtype=np.float64).reshape(1, *row_shape), "reference_mean")
    return zeros(row_shape, f"the reference profile keeps no mean row of {name!r} (integer data, rows over "
                            "65536 values, or a profile built before means were kept: rebuild it)")


def _sample_rows(tensor, row_shape: tuple[int, ...], max_rows: int) -> Background:
    from leanserve.monitor.profile import CategoricalFeature

    samples = [f.sample for f in tensor.features if not isinstance(f, CategoricalFeature)]
    count = min(min((len(s) for s in samples), default=1), max_rows)
    if count < 1:
        return zeros(row_shape, f"the reference profile of {tensor.name!r} keeps no finite sample of a column")
    columns = []
    for feature in tensor.features:
        if isinstance(feature, CategoricalFeature):
            columns.append(np.full(count, feature.categories[int(np.argmax(feature.counts))], dtype=np.float64))
        else:
            columns.append(np.asarray(feature.sample[:count], dtype=np.float64))
    rows = np.stack(columns, axis=1).reshape(count, *row_shape)
    return Background(rows, f"reference_sample:{count}")
