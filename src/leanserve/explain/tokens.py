"""Hiding tokens: the players of a token model's explanation are the positions of a row the model
attends to (``attention_mask`` 1, or every position when it has none). A hidden token is dropped from the
attention mask (default when the model has one: no vocabulary knowledge needed, and mean-pooling models
leave it out of the pool too), or replaced by ``explain_mask_token`` (the tokenizer's [MASK] or pad id;
0 when the model has no attention mask). Companion inputs (``token_type_ids``) are kept as they are, so
every masked copy stays a valid input of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanserve.explain.methods import ExplanationUnavailable
from leanserve.explain.targets import TokenInputs

DEFAULT_MASK_ID = 0  # the pad id of BERT-style vocabularies, for models without an attention mask


class SequenceTooLong(ExplanationUnavailable):
    """A row has more tokens to explain than the server's ``explain.max_tokens`` (HTTP 400)."""


@dataclass(frozen=True)
class TokenRow:
    """One row of a token model's inputs (each ``(sequence,)``) and how its tokens are hidden."""

    inputs: dict[str, np.ndarray]
    tokens: TokenInputs
    positions: np.ndarray  # the explained positions, ascending
    mask_id: int | None  # None: hidden tokens leave the attention mask

    def masked(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """The model inputs for masks ``keep`` (``(n, len(positions))``, 1 keeps a token): ``(n, sequence)`` each."""
        hidden = np.asarray(keep) < 0.5
        batch = {name: np.repeat(row[None], len(hidden), axis=0) for name, row in self.inputs.items()}
        if self.mask_id is None:
            name, fill = self.tokens.attention_mask, 0
        else:
            name, fill = self.tokens.ids, self.mask_id
        column = batch[name][:, self.positions]
        batch[name][:, self.positions] = np.where(hidden, fill, column).astype(column.dtype)
        return batch


def mask_id_for(tokens: TokenInputs, requested: int | None) -> int | None:
    """The id hidden tokens get: ``requested``, else none when the model has an attention mask to drop
    them from, else ``DEFAULT_MASK_ID``."""
    if requested is not None:
        return requested
    return None if tokens.attention_mask is not None else DEFAULT_MASK_ID


def masking_name(mask_id: int | None) -> str:
    """How hidden tokens are hidden, as the response names it."""
    return "attention_mask" if mask_id is None else f"token_id:{mask_id}"


def token_rows(inputs: dict[str, np.ndarray], tokens: TokenInputs, mask_id: int | None) -> list[TokenRow]:
    """Each row of a request's token inputs, ready to mask."""
    names = (tokens.ids, *((tokens.attention_mask,) if tokens.attention_mask else ()), *tokens.others)
    rows = []
    for i in range(len(inputs[tokens.ids])):
        row = {name: np.array(inputs[name][i]) for name in names}
        rows.append(TokenRow(row, tokens, _positions(row, tokens), mask_id))
    return rows


def check_lengths(inputs: dict[str, np.ndarray], tokens: TokenInputs, max_tokens: int) -> None:
    """Raise SequenceTooLong when a row has more than ``max_tokens`` tokens to explain. Runs before the
    request's inputs are validated: malformed ones are left to the validation that follows."""
    ids = np.asarray(inputs.get(tokens.ids))
    mask = np.asarray(inputs.get(tokens.attention_mask)) if tokens.attention_mask else None
    if ids.ndim != 2:
        return
    if mask is not None and mask.shape == ids.shape:
        longest = int((mask != 0).sum(axis=1).max(initial=0))
    else:
        longest = ids.shape[1]
    if longest > max_tokens:
        raise SequenceTooLong(
            f"{tokens.ids!r} has a row of {longest} tokens to explain; this server explains at most {max_tokens} per "
            "row (explain.max_tokens), because the cost grows with the square of the length: send shorter "
            "text, or split it")


def _positions(row: dict[str, np.ndarray], tokens: TokenInputs) -> np.ndarray:
    if tokens.attention_mask is None:
        return np.arange(len(row[tokens.ids]))
    return np.flatnonzero(row[tokens.attention_mask] != 0)
