"""A tiny text pipeline for tests: a word-level Hugging Face tokenizer (built with ``tokenizers``, no
download) and a bag-of-words ONNX model, as a sentiment classifier or a sentence encoder.

The classifier's ``great`` (and ``loved``) push towards ``positive``, ``terrible`` (and ``slow``) towards
``negative``; every other word is small noise. The encoder's token states are the words' vectors through
one MatMul, mean-pooled by the pipeline. Both take ``input_ids``, ``attention_mask`` and
``token_type_ids`` [batch, sequence], like BERT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SPECIAL = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
WORDS = ["the", "food", "was", "great", "service", "terrible", "slow", "and", "i", "it", "loved", "a", "very",
         "place", "staff", "friendly", "cold", "menu", "good", "bad", "not", "again", "would", "come", "back"]
VOCAB = SPECIAL + WORDS
LABELS = ["negative", "positive"]
POSITIVE_WORDS, NEGATIVE_WORDS = ("great", "loved"), ("terrible", "slow")
DIM = 8
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_tokenizer(path: Path) -> Path:
    """A lower-casing, whitespace-splitting word-level tokenizer that adds [CLS] ... [SEP], as tokenizer.json."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    tokenizer.save(str(path))
    return path


def _word_vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((len(VOCAB), DIM)) * 0.1).astype(np.float32)
    vectors[0] = 0.0
    for word in POSITIVE_WORDS:
        vectors[VOCAB.index(word), 0] = 4.0
    for word in NEGATIVE_WORDS:
        vectors[VOCAB.index(word), 0] = -4.0
    return vectors


def make_bag_model(path: Path, head: str = "classify") -> Path:
    """The ONNX model: ``logits`` [batch, 2] (head ``classify``: masked mean of word vectors, then a linear
    layer) or ``last_hidden_state`` [batch, sequence, DIM] (head ``embed``: word vectors through a MatMul)."""
    rng = np.random.default_rng(1)
    mixing = (np.eye(DIM) + rng.standard_normal((DIM, DIM)) * 0.05).astype(np.float32)
    weights = np.zeros((DIM, 2), np.float32)
    weights[0] = [-1.0, 1.0]
    weights[1:] = rng.standard_normal((DIM - 1, 2)).astype(np.float32) * 0.1
    initializers = [numpy_helper.from_array(a, n) for a, n in (
        (_word_vectors(), "words"), (np.zeros((2, DIM), np.float32), "types"), (mixing, "mixing"),
        (weights, "weights"), (np.array([0.0, 0.1], np.float32), "bias"), (np.array([2], np.int64), "last"),
        (np.array([1], np.int64), "seq"), (np.array(1.0, np.float32), "one"))]
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["word_vectors"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["type_vectors"]),
        helper.make_node("Add", ["word_vectors", "type_vectors"], ["vectors"]),
        helper.make_node("MatMul", ["vectors", "mixing"], ["states"]),
    ]
    if head == "embed":
        nodes.append(helper.make_node("Identity", ["states"], ["last_hidden_state"]))
        output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", DIM])
    else:
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
            helper.make_node("Mul", ["states", "mask3"], ["kept"]),
            helper.make_node("ReduceSum", ["kept", "seq"], ["total"], keepdims=0),
            helper.make_node("ReduceSum", ["mask", "seq"], ["count"], keepdims=1),
            helper.make_node("Max", ["count", "one"], ["denominator"]),
            helper.make_node("Div", ["total", "denominator"], ["pooled"]),
            helper.make_node("MatMul", ["pooled", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
        ]
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph(
        nodes, "bag", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUTS],
        [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_text_pipeline(folder: Path, head: str = "classify", max_length: int = 32,
                       labels: tuple[str, str] = tuple(LABELS)) -> Path:
    """``folder`` with pipeline.json, model.onnx and tokenizer.json: a text classifier (``labels``: class 0
    negative, class 1 positive) or a sentence encoder (mean pooling, normalized). Returns the pipeline.json."""
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder / "tokenizer.json")
    make_bag_model(folder / "model.onnx", head)
    if head == "embed":
        task, post = "sentence-embedding", {"kind": "pool", "dimension": DIM, "mode": "mean", "normalize": True}
    else:
        task, post = "text-classification", {"kind": "classify", "labels": list(labels), "top_k": 2}
    spec = {"kind": "leanserve.pipeline/v1", "task": task, "model_file": "model.onnx", "model_format": "onnx",
            "pre": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": max_length, "truncate": False,
                    "inputs": list(INPUTS)},
            "post": post, "files": ["tokenizer.json"], "provenance": {}}
    (folder / "pipeline.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder / "pipeline.json"


def sentences(count: int, seed: int = 0, positive_share: float = 0.5) -> tuple[list[str], np.ndarray]:
    """``count`` short reviews of 3-10 words and their labels (1 positive, 0 negative), drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    neutral = [w for w in WORDS if w not in POSITIVE_WORDS + NEGATIVE_WORDS]
    texts, labels = [], []
    for _ in range(count):
        label = int(rng.random() < positive_share)
        words = list(rng.choice(neutral, size=int(rng.integers(2, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE_WORDS if label else NEGATIVE_WORDS)))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, np.array(labels, dtype=np.int64)
