"""Reference profiles: what a model version's inputs and outputs looked like on evaluation data.

A profile is built once from evaluation or calibration arrays (each with a leading batch axis) and
stored as JSON beside the version; the drift detectors in ``monitor/drift.py`` compare live windows
against it. Outputs are profiled exactly like inputs, so prediction drift is drift of the outputs.

Two kinds of tensor profile:

- **tabular** (1-D, or 2-D with at most ``TABULAR_MAX_COLUMNS`` columns): one profile per column.
  Integer-valued columns with few distinct values are categorical (category counts, for chi-square);
  the others are numeric (mean, std, quantiles, PSI bins from reference deciles, and a uniform sample
  of values for KS).
- **reduced** (images, sequences, embeddings): each row is flattened and sent through a fixed, seeded
  random projection to ``REDUCED_DIMS`` dimensions; a sample of reduced rows is kept for MMD. Floating-point
  tensors of at most ``MEAN_MAX_VALUES`` values per row also keep their mean row, unprojected: the
  background that explanations hide pixels behind (``leanserve.explain``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput

FORMAT = "leanserve-profile"
FORMAT_VERSION = 1
TABULAR_MAX_COLUMNS = 64
REDUCED_DIMS = 32
QUANTILE_LEVELS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
PSI_BINS = 10  # the customary PSI binning: reference deciles
MEAN_MAX_VALUES = 1 << 16  # a 256x256 grey image; larger rows keep no mean (the JSON would grow by megabytes)


@dataclass(frozen=True)
class NumericFeature:
    """Summary of one numeric column: moments, quantiles, PSI bins and a value sample for KS.

    ``edges`` are the interior bin edges (reference deciles, duplicates removed); ``fractions`` has
    one entry more: the reference share of each bin, bin ``i`` holding ``edges[i-1] <= v < edges[i]``.
    """

    name: str
    mean: float
    std: float
    quantiles: tuple[float, ...]
    edges: tuple[float, ...]
    fractions: tuple[float, ...]
    sample: tuple[float, ...]


@dataclass(frozen=True)
class CategoricalFeature:
    """Counts of each category of an integer-valued column with few distinct values."""

    name: str
    categories: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def frequencies(self) -> dict[int, int]:
        return dict(zip(self.categories, self.counts, strict=True))


Feature = NumericFeature | CategoricalFeature


@dataclass(frozen=True)
class TabularProfile:
    """A tensor profiled column by column; ``row_shape`` is the shape of one row (``()`` or ``(k,)``)."""

    name: str
    row_shape: tuple[int, ...]
    rows: int
    features: tuple[Feature, ...]


@dataclass(frozen=True)
class ReducedProfile:
    """A tensor profiled as a whole: a sample of its rows after the seeded random projection."""

    name: str
    row_shape: tuple[int, ...]
    rows: int
    projection_seed: int
    sample: tuple[tuple[float, ...], ...]
    mean: tuple[float, ...] = ()  # the mean row, flattened; empty for integer data, large rows and older profiles

    @property
    def flat_size(self) -> int:
        return math.prod(self.row_shape)


TensorProfile = TabularProfile | ReducedProfile


@dataclass(frozen=True)
class Profile:
    """The reference profiles of a version's named tensors (inputs and outputs alike)."""

    tensors: tuple[TensorProfile, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def tensor(self, name: str) -> TensorProfile:
        """The profile of tensor ``name``; raises InvalidInput naming the known tensors if absent."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise InvalidInput(f"unknown tensor {name!r}: the reference profile has {', '.join(self.names) or 'none'}")

    def reduce(self, name: str, array: np.ndarray) -> np.ndarray:
        """Apply tensor ``name``'s projection to live rows: returns float64 ``(rows, REDUCED_DIMS)``.

        Raises InvalidInput if the tensor is unknown, is profiled per column (tabular), or the
        array's row shape differs from the reference's.
        """
        t = self.tensor(name)
        if not isinstance(t, ReducedProfile):
            raise InvalidInput(f"tensor {name!r} is profiled per column (tabular), not reduced by projection")
        array = np.asarray(array)
        if array.ndim < 1 or tuple(array.shape[1:]) != t.row_shape:
            raise InvalidInput(
                f"tensor {name!r}: expected rows of shape {list(t.row_shape)} after the batch axis, "
                f"got an array of shape {list(array.shape)}"
            )
        return project(as_float64(name, array).reshape(len(array), -1), t.projection_seed)

    def to_json(self) -> str:
        """Serialise to JSON text; ``Profile.from_json(p.to_json()) == p`` exactly."""
        body = {"format": FORMAT, "version": FORMAT_VERSION, "tensors": [_tensor_to_dict(t) for t in self.tensors]}
        return json.dumps(body, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """Parse the text ``to_json`` wrote; raises InvalidInput if it is not a profile this code reads."""
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT or body.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {body.get('format')!r} version {body.get('version')!r}")
            return cls(tuple(_tensor_from_dict(t) for t in body["tensors"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"not a {FORMAT} version {FORMAT_VERSION} file: {exc}") from exc


def build_profile(
    arrays: Mapping[str, np.ndarray], *, max_rows: int = 2000, categorical_max_unique: int = 20, seed: int = 0
) -> Profile:
    """Profile named arrays, each with a leading batch axis (see the module docstring for the rules).

    ``max_rows`` caps the KS value samples and the MMD row samples (moments, quantiles, PSI bins and
    category counts use every row); ``seed`` fixes both the sampling and the random projection.
    Raises InvalidInput for an array without a batch axis, without rows, or with non-numeric data.
    """
    rng = np.random.default_rng(seed)
    tensors: list[TensorProfile] = []
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.ndim < 1 or len(array) == 0:
            raise InvalidInput(f"tensor {name!r}: a profile needs an array with a batch axis and rows, got shape {list(array.shape)}")
        rows = np.sort(rng.choice(len(array), size=min(max_rows, len(array)), replace=False))
        if is_tabular(array.shape):
            tensors.append(_tabular(name, as_float64(name, array), rows, categorical_max_unique))
        else:
            # only the sampled rows are converted: a large image set need not fit in memory as float64
            reduced = project(as_float64(name, array[rows]).reshape(len(rows), -1), seed)
            finite = reduced[np.isfinite(reduced).all(axis=1)]
            sample = tuple(tuple(float(v) for v in row) for row in finite)
            tensors.append(ReducedProfile(name, tuple(array.shape[1:]), len(array), seed, sample, _mean_row(array)))
    return Profile(tuple(tensors))


def is_tabular(shape: tuple[int, ...]) -> bool:
    """Whether an array of this shape (batch axis first) is profiled per column."""
    return len(shape) == 1 or (len(shape) == 2 and shape[1] <= TABULAR_MAX_COLUMNS)


def project(flat: np.ndarray, seed: int) -> np.ndarray:
    """Project flattened rows ``(n, d)`` to ``(n, REDUCED_DIMS)`` with the seed's fixed random matrix."""
    return np.asarray(flat, dtype=np.float64) @ _projection(flat.shape[1], seed)


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The PSI bin of each value: 0 below ``edges[0]``, ``len(edges)`` at or above ``edges[-1]``."""
    return np.searchsorted(edges, values, side="right")


@functools.lru_cache(maxsize=8)
def _projection(in_dims: int, seed: int) -> np.ndarray:
    # A sign (Achlioptas) random projection built from PCG64's raw output: NumPy guarantees the raw
    # bit stream across versions, not the samplers on top (e.g. standard_normal), and a stored
    # profile must reduce live data with the very matrix that reduced the reference.
    n = in_dims * REDUCED_DIMS
    raw = np.random.PCG64(seed).random_raw(max(1, -(-n // 64))).astype("<u8")
    bits = np.unpackbits(raw.view(np.uint8))[:n].astype(np.float64)
    matrix = (2.0 * bits - 1.0).reshape(in_dims, REDUCED_DIMS) / math.sqrt(REDUCED_DIMS)
    matrix.setflags(write=False)
    return matrix


def as_float64(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as float64; raises InvalidInput naming tensor ``name`` if its data is not numeric."""
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InvalidInput(f"tensor {name!r}: drift profiles need numeric data, got dtype {array.dtype}")
    return array.astype(np.float64)


def _mean_row(array: np.ndarray) -> tuple[float, ...]:
    """The mean of the rows without non-finite values, flattened; empty when the data is not floating-point,
    a row is over ``MEAN_MAX_VALUES`` values or no row is finite."""
    flat = array.reshape(len(array), -1)
    if not np.issubdtype(array.dtype, np.floating) or flat.shape[1] > MEAN_MAX_VALUES:
        return ()
    finite = np.isfinite(flat).all(axis=1)
    if not finite.any():
        return ()
    return tuple(float(v) for v in np.mean(flat[finite], axis=0, dtype=np.float64))


def _tabular(name: str, values: np.ndarray, rows: np.ndarray, categorical_max_unique: int) -> TabularProfile:
    columns = values.reshape(len(values), -1)
    features = []
    for j in range(columns.shape[1]):
        column = columns[:, j]
        finite = np.isfinite(column)
        uniques = np.unique(column[finite])
        if len(uniques) <= categorical_max_unique and np.all(uniques == np.round(uniques)):
            features.append(_categorical(str(j), column[finite]))
        else:
            features.append(_numeric(str(j), column[finite], column[rows][finite[rows]]))
    return TabularProfile(name, tuple(values.shape[1:]), len(values), tuple(features))


def _categorical(name: str, column: np.ndarray) -> CategoricalFeature:
    categories, counts = np.unique(column, return_counts=True)
    return CategoricalFeature(name, tuple(int(c) for c in categories), tuple(int(n) for n in counts))


def _numeric(name: str, column: np.ndarray, sample: np.ndarray) -> NumericFeature:
    if len(column) == 0:
        raise InvalidInput(f"column {name}: no finite values to profile")
    edges = np.unique(np.quantile(column, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    fractions = np.bincount(bin_index(edges, column), minlength=len(edges) + 1) / len(column)
    return NumericFeature(
        name=name,
        mean=float(column.mean()),
        std=float(column.std()),
        quantiles=tuple(float(q) for q in np.quantile(column, QUANTILE_LEVELS)),
        edges=tuple(float(e) for e in edges),
        fractions=tuple(float(f) for f in fractions),
        sample=tuple(float(v) for v in sample),
    )


def _tensor_to_dict(t: TensorProfile) -> dict[str, Any]:
    head = {"name": t.name, "row_shape": list(t.row_shape), "rows": t.rows}
    if isinstance(t, ReducedProfile):
        mean = {"mean": list(t.mean)} if t.mean else {}
        return {**head, "kind": "reduced", "projection_seed": t.projection_seed, "sample": [list(r) for r in t.sample],
                **mean}
    features = [
        {"kind": "categorical", "name": f.name, "categories": list(f.categories), "counts": list(f.counts)}
        if isinstance(f, CategoricalFeature)
        else {"kind": "numeric", "name": f.name, "mean": f.mean, "std": f.std, "quantiles": list(f.quantiles),
              "edges": list(f.edges), "fractions": list(f.fractions), "sample": list(f.sample)}
        for f in t.features
    ]
    return {**head, "kind": "tabular", "features": features}


def _tensor_from_dict(d: Mapping[str, Any]) -> TensorProfile:
    name, row_shape, rows = str(d["name"]), tuple(int(s) for s in d["row_shape"]), int(d["rows"])
    if d["kind"] == "reduced":
        sample = tuple(tuple(float(v) for v in r) for r in d["sample"])
        return ReducedProfile(name, row_shape, rows, int(d["projection_seed"]), sample, _floats(d.get("mean", ())))
    if d["kind"] != "tabular":
        raise ValueError(f"tensor {name!r}: unknown kind {d['kind']!r}")
    return TabularProfile(name, row_shape, rows, tuple(_feature_from_dict(f) for f in d["features"]))


def _feature_from_dict(f: Mapping[str, Any]) -> Feature:
    if f["kind"] == "categorical":
        return CategoricalFeature(str(f["name"]), _ints(f["categories"]), _ints(f["counts"]))
    if f["kind"] != "numeric":
        raise ValueError(f"feature {f.get('name')!r}: unknown kind {f['kind']!r}")
    return NumericFeature(str(f["name"]), float(f["mean"]), float(f["std"]), _floats(f["quantiles"]),
                          _floats(f["edges"]), _floats(f["fractions"]), _floats(f["sample"]))


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)
