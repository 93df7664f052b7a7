"""What drift watches of a version's inputs and outputs, and so what its reference profile holds.

The prediction log keeps a request as it came and went (a text model's text itself, as UTF-8, and its
outputs: the embedding, or the labels and probabilities, and ``token_count``), so feedback, learning and
replays have the real data. Drift is measured on numbers, and on text only through what the model made of
it:

- numeric tensors with a fixed row shape are watched as they are (an embedding through MMD, class
  probabilities and ``token_count`` column by column);
- text, label names and other BYTES tensors are not compared (strings have no distance here; the
  embedding or probabilities beside them carry the shift);
- token tensors (``input_ids``, ``attention_mask``, ``token_type_ids``, or any integer tensor whose
  sequence axis varies) are never compared position by position: a padded id at position 7 means
  nothing, and rows of different lengths do not even stack. They become one column, ``sequence_length``
  (tokens per row from the attention mask, else the row's length);
- floating-point token states with a varying sequence axis (``last_hidden_state`` of a model served
  without its pipeline) become their mean over the attended tokens, ``NAME.mean``: the sentence embedding.

The reference (``reference.build_reference``) and the live window (``rounds.drift_round``) both go
through ``watched``, row by row for the log, so they always see the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from leanserve.artifact import Signature, TensorSpec

TOKEN_TENSORS = ("input_ids", "attention_mask", "token_type_ids")
SEQUENCE_LENGTH = "sequence_length"
MEAN_SUFFIX = ".mean"


def watched(signature: Signature, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays drift profiles and tests see, from a version's inputs and outputs ``arrays`` (leading
    batch axis; names not in ``signature`` are passed through when numeric with a batch axis)."""
    specs = {s.name: s for s in (*signature.inputs, *signature.outputs)}
    mask = _attention_mask(arrays)
    out: dict[str, np.ndarray] = {}
    tokens: np.ndarray | None = None
    for name, array in arrays.items():
        array = np.asarray(array)
        spec = specs.get(name)
        if array.ndim < 1 or not _numeric(array):
            continue  # text, label names: see the module docstring
        if _is_tokens(name, array, spec):
            tokens = array if tokens is None else tokens
        elif _varies_in_sequence(array, spec) and np.issubdtype(array.dtype, np.floating):
            out[name + MEAN_SUFFIX] = _masked_mean(array, mask)
        elif not _varies_in_sequence(array, spec):
            out[name] = array
    if tokens is not None:
        out[SEQUENCE_LENGTH] = _lengths(tokens, mask)
    return out


def watched_rows(signature: Signature, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``watched`` of each logged request (its inputs and outputs together), stacked: requests with
    sequences of different lengths become rows of the same tensors. Tensors some requests lack are left out."""
    per_row = [watched(signature, row) for row in rows]
    if not per_row:
        return {}
    names = [n for n in per_row[0] if all(n in r for r in per_row)]
    stacked = {}
    for name in names:
        parts = [r[name] for r in per_row]
        if len({p.shape[1:] for p in parts}) == 1:
            stacked[name] = np.concatenate(parts)
    return stacked


def _numeric(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_


def _is_tokens(name: str, array: np.ndarray, spec: TensorSpec | None) -> bool:
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        return False
    return name in TOKEN_TENSORS or _varies_in_sequence(array, spec)


def _varies_in_sequence(array: np.ndarray, spec: TensorSpec | None) -> bool:
    """Whether axis 1 is a sequence axis of varying length (a dynamic axis after the batch axis)."""
    return spec is not None and len(spec.shape) >= 2 and spec.shape[1] == -1 and array.ndim >= 2


def _attention_mask(arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    mask = arrays.get("attention_mask")
    return None if mask is None else np.asarray(mask)


def _lengths(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None and mask.shape == array.shape:
        return (mask != 0).sum(axis=1).astype(np.int64)
    return np.full(len(array), array.shape[1], dtype=np.int64)


def _masked_mean(states: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean over axis 1 of ``states`` ([batch, sequence, ...]), over the attended positions only."""
    flat = states.reshape(states.shape[0], states.shape[1], -1).astype(np.float64)
    if mask is None or mask.shape != states.shape[:2]:
        return flat.mean(axis=1)
    weights = (mask != 0).astype(np.float64)[:, :, None]
    return (flat * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
