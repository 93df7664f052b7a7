"""Text input stage: V2 BYTES holding UTF-8 text -> token id tensors, with Hugging Face ``tokenizers``.

A batch is encoded at once (``encode_batch`` runs in Rust, across threads) and padded to its longest
member, never to a fixed length. Texts longer than the model's ``max_length`` are refused with the limit
in the message, unless the pipeline was imported with truncation on (sentence-transformers truncates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput, ModelLoadError

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SPECIAL_TOKENS_BOUND = 4  # [CLS] ... [SEP] and friends: a text of n bytes never has more than n + this tokens


@dataclass(frozen=True)
class TextSpec:
    """The text stage of a pipeline: tokenizer file, the most tokens the model takes, whether to cut."""

    tokenizer: str  # file name beside pipeline.json
    max_length: int
    truncate: bool = False
    inputs: tuple[str, ...] = TOKEN_INPUTS  # which of the token tensors the model takes, in its order

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "tokenizer": self.tokenizer, "max_length": self.max_length,
                "truncate": self.truncate, "inputs": list(self.inputs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextSpec:
        try:
            spec = cls(str(data["tokenizer"]), int(data["max_length"]), bool(data.get("truncate", False)),
                       tuple(data.get("inputs", TOKEN_INPUTS)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"pipeline text stage: needs tokenizer and max_length ({exc})") from exc
        unknown = [n for n in spec.inputs if n not in TOKEN_INPUTS]
        if unknown or spec.max_length < 2:
            raise ModelLoadError(f"pipeline text stage: inputs must be among {TOKEN_INPUTS} and max_length >= 2")
        return spec


@dataclass(frozen=True)
class Encoded:
    """A tokenized batch: the model's token tensors, padded to the longest text, and each text's length."""

    tensors: dict[str, np.ndarray]
    lengths: np.ndarray  # tokens per text, special tokens included


class TextStage:
    """Tokenizes batches of UTF-8 texts. ``tokenizers.Tokenizer`` is thread-safe for encoding; padding and
    truncation are set once at load and never changed, so one stage serves every worker thread."""

    def __init__(self, folder: Path, spec: TextSpec) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        try:
            tokenizer = Tokenizer.from_file(str(folder / spec.tokenizer))
        except Exception as exc:  # the Rust library raises its own Exception type
            raise ModelLoadError(f"{spec.tokenizer}: not a Hugging Face tokenizer.json ({exc})") from exc
        pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else (tokenizer.token_to_id("[PAD]") or 0)
        pad_token = tokenizer.padding["pad_token"] if tokenizer.padding else "[PAD]"
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest in each batch
        if spec.truncate:
            tokenizer.enable_truncation(spec.max_length)
        else:
            tokenizer.no_truncation()  # lengths are checked instead, so a too-long text is an error
        self._tokenizer = tokenizer

    def texts(self, name: str, items: np.ndarray, allow_empty: bool = False) -> list[str]:
        """Decode a BYTES array's elements as UTF-8; refuse undecodable ones, and empty ones unless
        ``allow_empty`` (warm-up runs send empty elements). Raises InvalidInput naming the row."""
        texts = []
        for row, blob in enumerate(items.reshape(-1)):
            if isinstance(blob, str):
                text = blob
            else:
                try:
                    text = bytes(blob).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidInput(f"input {name!r} row {row}: text is not valid UTF-8 ({exc.reason} at byte "
                                       f"{exc.start})") from None
            if not allow_empty and not text.strip():
                raise InvalidInput(f"input {name!r} row {row}: empty text; send at least one non-space character")
            texts.append(text)
        return texts

    def check(self, name: str, items: np.ndarray) -> int:
        """Validate a request's texts before it is queued; return its longest length in tokens, bounded
        from above. Short texts are not tokenized here: no tokenizer makes more tokens than bytes plus its
        special tokens, so only a text over ``max_length - SPECIAL_TOKENS_BOUND`` bytes is counted exactly
        (on the event loop, but rarely). Raises InvalidInput, with the limit for an over-long text."""
        texts = self.texts(name, items)
        longest = 0
        for row, text in enumerate(texts):
            bound = len(text.encode("utf-8")) + SPECIAL_TOKENS_BOUND
            if bound > self.spec.max_length:
                bound = len(self._tokenizer.encode(text).ids)
                if bound > self.spec.max_length and not self.spec.truncate:
                    raise InvalidInput(f"input {name!r} row {row}: text of {bound} tokens exceeds this model's limit "
                                       f"of {self.spec.max_length} tokens; shorten it or split it")
            longest = max(longest, min(bound, self.spec.max_length))
        return longest

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Token tensors (int64, padded to the longest text) for ``texts``. Raises InvalidInput for a text
        over ``max_length`` when truncation is off."""
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        lengths = mask.sum(axis=1)
        if not self.spec.truncate and lengths.size and lengths.max() > self.spec.max_length:
            row = int(lengths.argmax())
            raise InvalidInput(f"text {row} has {int(lengths[row])} tokens; this model's limit is {self.spec.max_length}")
        tensors = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.spec.inputs:
            tensors["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return Encoded({n: tensors[n] for n in self.spec.inputs}, lengths)

    def tokens(self, texts: Sequence[str]) -> list[list[dict[str, Any]]]:
        """Per text, its tokens: id, string and character span (the ``tokenize`` endpoint's answer)."""
        out = []
        for encoding in self._tokenizer.encode_batch(list(texts)):
            out.append([{"id": i, "text": t, "special": bool(s), "start": o[0], "stop": o[1]}
                        for i, t, s, o, m in zip(encoding.ids, encoding.tokens, encoding.special_tokens_mask,
                                                 encoding.offsets, encoding.attention_mask) if m])
        return out
