"""SHAP's model-agnostic explainers over any engine: permutation (antithetic permutations), partition
(Owen values over a hierarchy of features) and kernel (weighted linear regression on coalitions).

Each row is explained on its own, as a scalar function of its features (``methods.scalar``): the
engine's outputs for masked copies of the row, reduced to the row's score. Features are pixels or
columns, whose hidden values come from background rows (``background.py``), or a token model's
positions, whose game is played on keep-masks (``tokens.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from leanserve.explain.methods import (
    COLUMN,
    KERNEL,
    PARTITION,
    PERMUTATION,
    SIMILARITY,
    Attribution,
    Deadline,
    columns,
    scalar,
    score_targets,
)
from leanserve.explain.tokens import TokenRow

_MAX_ROWS_PER_RUN = 2048  # masked rows SHAP hands over at once
# Masked rows per engine call: about 32k input values. Cache-sized calls ran the digits CNN's 1088 masked
# rows in 34-40 ms against 52 ms in one call (ONNX Runtime, one thread); a small tabular row still goes
# in calls of a thousand rows, where per-call overhead would dominate.
_ENGINE_CALL_VALUES = 32_768

Predict = Callable[[np.ndarray], np.ndarray]
Game = Callable[[np.ndarray], np.ndarray]  # masked rows (n, m) -> the explained score of each (n,)


def explain_features(method: str, predict: Predict, x: np.ndarray, background: np.ndarray, deadline: Deadline, *,
                     target: int | None = None, score: str = COLUMN, max_evals: int = 500,
                     permutations: int | None = None, seed: int = 0) -> Attribution:
    """SHAP values of each row of ``x`` (features or pixels) by ``method``.

    ``predict`` maps a batch shaped like ``x`` to the explained output; ``background`` holds the rows
    whose values stand in for hidden features (``(b, *x.shape[1:])``). ``max_evals`` bounds the model
    evaluations per row (``permutations``, when given, sets the permutation explainer's instead).
    Raises ExplanationTimeout when ``deadline`` passes.
    """
    row_shape = x.shape[1:]
    per_call = min(_MAX_ROWS_PER_RUN, max(32, _ENGINE_CALL_VALUES // max(1, math.prod(row_shape))))

    def outputs(flat: np.ndarray) -> np.ndarray:
        return columns(predict(flat.reshape(-1, *row_shape).astype(x.dtype, copy=False)))

    deadline.check()
    # SHAP sees float64 whatever the engine's dtype: its Numba kernels then compile once per process
    flat_x = x.reshape(len(x), -1).astype(np.float64)
    flat_background = background.reshape(len(background), -1).astype(np.float64)
    full = outputs(flat_x)
    targets = score_targets(full, target, score)
    tree = feature_tree(row_shape, flat_background) if method == PARTITION else None
    values, bases, scores = [], [], []
    for i, row in enumerate(flat_x):
        reference = full[i] if score == SIMILARITY else None
        game = _batched(lambda flat, i=i, reference=reference: scalar(outputs(flat), targets[i], reference),
                        per_call, deadline)
        phi, base = shap_row(method, game, row, flat_background, deadline, max_evals=max_evals,
                             permutations=permutations, clustering=tree, seed=seed)
        values.append(phi)
        bases.append(base)
        scores.append(scalar(full[i:i + 1], targets[i], reference)[0])
    return _attribution(method, np.asarray(values).reshape(x.shape), targets, scores, bases, score)


def explain_tokens(method: str, predict: Callable[[dict[str, np.ndarray]], np.ndarray], rows: list[TokenRow],
                   deadline: Deadline, *, target: int | None = None, score: str = COLUMN, max_evals: int = 500,
                   permutations: int | None = None, seed: int = 0) -> Attribution:
    """SHAP values of each token of each row by ``method``: ``(rows, sequence)``, zero at positions that are
    not explained (padding). ``predict`` maps a batch of model inputs to the explained output. Raises
    ExplanationTimeout when ``deadline`` passes."""
    deadline.check()
    length = len(rows[0].inputs[rows[0].tokens.ids])
    per_call = min(_MAX_ROWS_PER_RUN, max(8, _ENGINE_CALL_VALUES // max(1, length)))
    full = np.concatenate([columns(predict(row.masked(np.ones((1, len(row.positions)))))) for row in rows])
    targets = score_targets(full, target, score)
    values = np.zeros((len(rows), length), dtype=np.float64)
    bases, scores = [], []
    for i, row in enumerate(rows):
        reference = full[i] if score == SIMILARITY else None
        game = _batched(lambda keep, i=i, row=row, reference=reference:
                        scalar(columns(predict(row.masked(keep))), targets[i], reference), per_call, deadline)
        players = len(row.positions)
        phi, base = shap_row(method, game, np.ones(players), np.zeros((1, players)), deadline, max_evals=max_evals,
                             permutations=permutations, clustering=grid_tree((players,)) if players > 1 else None,
                             seed=seed)
        values[i, row.positions] = phi
        bases.append(base)
        scores.append(scalar(full[i:i + 1], targets[i], reference)[0])
    return _attribution(method, values, targets, scores, bases, score)


def shap_row(method: str, game: Game, x: np.ndarray, background: np.ndarray,
             deadline: Deadline, *, max_evals: int = 500, permutations: int | None = None,
             clustering: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """SHAP values of one row ``x`` (``(m,)``) of the scalar function ``game`` (``(n, m)`` -> ``(n,)``), hidden
    features taking the values of ``background`` rows (``(b, m)``), and the base value (mean of ``game`` over
    the background). ``clustering`` (a SciPy linkage matrix over the m features) is the partition
    explainer's hierarchy."""
    import shap

    features = len(x)
    if features <= 1:  # one player takes the whole gain (SHAP's explainers need at least two)
        base = float(game(background).mean())
        return np.full(features, float(game(x[None])[0]) - base), base
    batch = max(1, _MAX_ROWS_PER_RUN // len(background))
    if method == PERMUTATION:
        rounds = permutations or max(1, max_evals // (2 * features + 1))
        masker = shap.maskers.Independent(background, max_samples=len(background))
        explainer = shap.explainers.Permutation(game, masker, seed=seed)
        result = explainer(x[None], max_evals=rounds * (2 * features + 1), batch_size=batch, silent=True)
    elif method == PARTITION:
        masker = shap.maskers.Partition(background, max_samples=len(background), clustering=clustering)
        result = shap.explainers.Partition(game, masker)(x[None], max_evals=max(max_evals, 3), batch_size=batch,
                                                          silent=True)
    elif method == KERNEL:
        explainer = shap.KernelExplainer(game, background)
        # no L1 feature selection (SHAP's default keeps 10 features), and enough coalitions to pin m values
        values = explainer.shap_values(x[None], nsamples=max(max_evals, 2 * features + 2), l1_reg=False, silent=True)
        deadline.check()
        return np.asarray(values, dtype=np.float64).reshape(features), float(np.ravel(explainer.expected_value)[0])
    else:
        raise ValueError(f"not a SHAP method: {method!r}")
    return np.asarray(result.values, dtype=np.float64).reshape(features), float(np.ravel(result.base_values)[0])


def feature_tree(row_shape: tuple[int, ...], background: np.ndarray) -> np.ndarray:
    """The partition explainer's hierarchy of a row's features: columns clustered by their correlation over
    the background rows (SHAP's choice for tabular data) when there are enough rows and every column
    varies, otherwise neighbouring cells of the row's grid (pixels next to pixels).

    Complete linkage, not SHAP's default single linkage: on independent columns single linkage chains them
    into a tree as deep as the row is wide, and 500 evaluations never got below its first levels (every
    feature of the credit test model then took the same share)."""
    import shap

    if len(row_shape) == 1 and len(background) >= 3 and np.all(background.std(axis=0) > 0):
        return shap.utils.hclust(background, metric="correlation", linkage="complete")
    return grid_tree(tuple(row_shape))


@functools.lru_cache(maxsize=16)
def grid_tree(shape: tuple[int, ...]) -> np.ndarray:
    """A hierarchical clustering (SciPy linkage matrix) of the cells of a grid of ``shape``, numbered in C
    order: each cluster is a box, split in half across its longest side, the way SHAP's image masker
    groups pixels (SHAP builds that tree only inside its masker, for three axes)."""
    size = math.prod(shape)
    links: list[tuple[int, int, float, int]] = []

    def split(box: np.ndarray) -> int:
        if box.size == 1:
            return int(box.flat[0])
        axis = int(np.argmax(box.shape))
        left, right = np.split(box, [box.shape[axis] // 2], axis=axis)
        children = split(left), split(right)
        links.append((*children, float(box.size), box.size))
        return size + len(links) - 1

    split(np.arange(size).reshape(shape))
    tree = np.asarray(links, dtype=np.float64).reshape(-1, 4)
    tree.setflags(write=False)
    return tree


def _batched(run: Game, per_call: int, deadline: Deadline) -> Game:
    """``run`` over at most ``per_call`` rows at a time, checking ``deadline`` before each engine call."""
    def call(rows: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(rows), per_call):
            deadline.check()
            parts.append(run(rows[start:start + per_call]))
        return np.concatenate(parts) if parts else np.zeros(0)

    return call


def _attribution(method: str, values: np.ndarray, targets: np.ndarray, scores: list[float], bases: list[float],
                 score: str) -> Attribution:
    outputs, baseline = np.asarray(scores, dtype=np.float64), np.asarray(bases, dtype=np.float64)
    gap = np.abs(values.reshape(len(values), -1).sum(axis=1) - (outputs - baseline)).max(initial=0.0)
    return Attribution(method, values.astype(np.float32), targets, outputs, baseline, float(gap), score)
