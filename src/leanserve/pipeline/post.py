"""Output stages: pooling token states into sentence embeddings, and class scores into labels.

Mean and CLS pooling follow sentence-transformers' ``1_Pooling/config.json``; normalization its
``Normalize`` module (``modules.json``). Classification is a softmax with the top-k labels by name
(``id2label`` or a labels file) and the argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leanserve.artifact import TensorSpec
from leanserve.errors import ModelLoadError

EMBEDDING = "embedding"
LABEL, PROBABILITIES, TOP_LABELS, TOP_SCORES = "label", "probabilities", "top_labels", "top_scores"


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str = "mean", normalize: bool = True) -> np.ndarray:
    """[N, T, H] token states and their [N, T] attention mask -> [N, H] float32 sentence embeddings."""
    if mode == "cls":
        pooled = hidden[:, 0, :].astype(np.float32)
    else:
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def classify(logits: np.ndarray, labels: Sequence[str], top_k: int) -> dict[str, np.ndarray]:
    """Softmax probabilities, the argmax label and the top-k labels with their scores, per row."""
    probabilities = softmax(logits.astype(np.float32))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    names = np.asarray(labels, dtype=object)
    return {LABEL: names[order[:, 0]], PROBABILITIES: probabilities,
            TOP_LABELS: names[order], TOP_SCORES: np.take_along_axis(probabilities, order, axis=1)}


class PostStage:
    """The output stage of a pipeline, from ``post`` of ``pipeline.json``."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.kind = spec.get("kind")
        if self.kind == "pool":
            self.mode = str(spec.get("mode", "mean"))
            self.normalize = bool(spec.get("normalize", True))
            self.dimension = int(spec["dimension"])
            if self.mode not in ("mean", "cls"):
                raise ModelLoadError(f"pipeline pooling mode must be mean or cls, got {self.mode!r}")
        elif self.kind == "classify":
            self.labels = [str(x) for x in spec["labels"]]
            self.top_k = max(1, min(int(spec.get("top_k", 5)), len(self.labels)))
        else:
            raise ModelLoadError(f"pipeline output stage must be pool or classify, got {self.kind!r}")

    def outputs(self) -> tuple[TensorSpec, ...]:
        """The user-facing output tensors."""
        if self.kind == "pool":
            return (TensorSpec(EMBEDDING, "FP32", (-1, self.dimension)),)
        return (TensorSpec(LABEL, "BYTES", (-1,)), TensorSpec(PROBABILITIES, "FP32", (-1, len(self.labels))),
                TensorSpec(TOP_LABELS, "BYTES", (-1, self.top_k)), TensorSpec(TOP_SCORES, "FP32", (-1, self.top_k)))

    def __call__(self, model_output: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        if self.kind == "pool":
            if model_output.ndim == 2:  # the model pooled already
                return {EMBEDDING: pool(model_output[:, None, :], np.ones((len(model_output), 1)), "cls", self.normalize)}
            if mask is None:
                mask = np.ones(model_output.shape[:2], dtype=np.int64)
            return {EMBEDDING: pool(model_output, mask, self.mode, self.normalize)}
        return classify(model_output, self.labels, self.top_k)
