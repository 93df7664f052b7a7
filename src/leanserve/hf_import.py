"""``leanserve import`` of a Hugging Face / sentence-transformers folder: detect the task, export to ONNX,
attach the pipeline (tokenizer or image transform, pooling or labels), check it against the library's own
output, and register it.

Two versions come out: NAME, the pipeline (text or image bytes in, embeddings or labels out), and
NAME-tensors, the exported model alone (token ids or pixel tensors in), for clients that preprocess
themselves. The export uses the TorchScript-based exporter with eager attention: the graph ONNX
Runtime's transformer fusions recognise (the torch.export-based one makes its BERT fusion assert).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput, ModelLoadError

log = logging.getLogger(__name__)

CHECK_SENTENCES = (
    "A short sentence.",
    "Checking the exported model against the library on a longer sentence with more tokens in it.",
    "Numbers like 42 and punctuation, too!",
)
SENTENCE_EMBEDDING, TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION = (
    "sentence-embedding", "text-classification", "image-classification")


@dataclass(frozen=True)
class ImportResult:
    """What ``import_folder`` registered and how close it came to the library's own output."""

    task: str
    pipeline_ref: Any  # VersionRef of NAME
    tensors_ref: Any  # VersionRef of NAME-tensors
    check: dict[str, float]


def is_hf_folder(path: Path) -> bool:
    """True when ``path`` is a folder with a Hugging Face ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def detect_task(folder: Path) -> str:
    """The task of a Hugging Face folder, from ``modules.json`` and ``config.json``'s architectures.
    Raises InvalidInput naming what was found when it is none of the supported ones."""
    if (folder / "modules.json").is_file():
        return SENTENCE_EMBEDDING
    config = _json(folder / "config.json")
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return TEXT_CLASSIFICATION
        if arch.endswith("ForImageClassification"):
            return IMAGE_CLASSIFICATION
        if arch.endswith("Model") and ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
            return SENTENCE_EMBEDDING  # a bare encoder: feature extraction, mean-pooled
    raise InvalidInput(f"{folder}: cannot tell the task from config.json (architectures {architectures}); "
                       "supported: sentence-transformers folders, *Model encoders, *ForSequenceClassification, "
                       "*ForImageClassification")


def import_folder(folder: str | Path, repo, name: str, *, truncate: bool = False, check: bool = True,
                  tolerance: float = 1e-4) -> ImportResult:
    """Export and register the Hugging Face folder ``folder`` as ``name`` (the pipeline) and
    ``name-tensors`` (the model alone). Raises InvalidInput, ExportError, ModelLoadError; with ``check``,
    ModelLoadError when the pipeline's output differs from the library's by more than ``tolerance``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(folder)
    if not is_hf_folder(folder):
        raise InvalidInput(f"{folder}: not a Hugging Face model folder (no config.json)")
    task = detect_task(folder)
    with tempfile.TemporaryDirectory(prefix="leanserve-hf-") as tmp:
        stage = Path(tmp)
        spec = (_stage_image if task == IMAGE_CLASSIFICATION else _stage_text)(folder, stage, task, truncate)
        (stage / "pipeline.json").write_text(spec.to_json(), encoding="utf-8")
        figures = _check(folder, stage, task, tolerance) if check else {}
        from leanserve.artifact import Provenance

        provenance = Provenance(source=str(folder.resolve()), exporter="torchscript", recipe={"task": task})
        tensors_ref = repo.add(stage / "model.onnx", f"{name}-tensors", provenance=provenance, metrics=figures)
        pipeline_ref = repo.add(stage / "pipeline.json", name, provenance=provenance, metrics=figures)
    return ImportResult(task, pipeline_ref, tensors_ref, figures)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: unreadable ({exc})") from exc


def _labels(config) -> list[str]:
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def _stage_text(folder: Path, stage: Path, task: str, truncate: bool):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from leanserve.from_torch import export
    from leanserve.pipeline import PipelineSpec
    from leanserve.pipeline.text import TOKEN_INPUTS, TextSpec

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInput(f"{folder}: the tokenizer has no fast (Rust) version; leanserve serves tokenizer.json")
    tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
    loader = AutoModelForSequenceClassification if task == TEXT_CLASSIFICATION else AutoModel
    model = loader.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True).eval()
    encoded = tokenizer(list(CHECK_SENTENCES[:2]), padding=True, return_tensors="pt")
    names = [n for n in TOKEN_INPUTS if n in encoded]
    output = "logits" if task == TEXT_CLASSIFICATION else "last_hidden_state"

    class Tensors(torch.nn.Module):  # named tensors in, one tensor out: what the exporter takes
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            return getattr(self.model(**dict(zip(names, args))), output)

    export(Tensors().eval(), tuple(encoded[n] for n in names), stage / "model.onnx", input_names=names,
           output_names=[output], dynamic_axes={n: [0, 1] for n in names},
           output_axes={output: [0, 1]} if output == "last_hidden_state" else None,
           exporter="torchscript", tolerance=1e-3)
    text = TextSpec("tokenizer.json", _max_length(folder, tokenizer, model.config), truncate, tuple(names))
    if task == TEXT_CLASSIFICATION:
        post = {"kind": "classify", "labels": _labels(model.config), "top_k": min(5, model.config.num_labels)}
    else:
        post = {"kind": "pool", "dimension": int(model.config.hidden_size), **_pooling(folder)}
    return PipelineSpec(task, "model.onnx", "onnx", text.to_dict(), post, ("tokenizer.json",))


def _max_length(folder: Path, tokenizer, config) -> int:
    # sentence-transformers' own limit first (MiniLM: 256), then the tokenizer's, then the position table
    limits = [int(config.max_position_embeddings)] if getattr(config, "max_position_embeddings", None) else []
    if (folder / "sentence_bert_config.json").is_file():
        limits.append(int(_json(folder / "sentence_bert_config.json").get("max_seq_length") or 10**9))
    if 0 < int(getattr(tokenizer, "model_max_length", 0) or 0) < 10**6:
        limits.append(int(tokenizer.model_max_length))
    return min(limits) if limits else 512


def _pooling(folder: Path) -> dict[str, Any]:
    """Pooling mode and normalization from sentence-transformers' modules.json and 1_Pooling/config.json."""
    if not (folder / "modules.json").is_file():
        return {"mode": "mean", "normalize": False}
    modules = _json(folder / "modules.json")
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    mode = "mean"
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            pooling = _json(folder / module.get("path", "1_Pooling") / "config.json")
            if pooling.get("pooling_mode_cls_token"):
                mode = "cls"
            elif not pooling.get("pooling_mode_mean_tokens", True):
                raise InvalidInput(f"{folder}: only mean and CLS pooling are supported; 1_Pooling/config.json asks "
                                   f"for {[k for k, v in pooling.items() if k.startswith('pooling_mode') and v]}")
    return {"mode": mode, "normalize": normalize}


def _stage_image(folder: Path, stage: Path, task: str, truncate: bool):
    import torch
    from transformers import AutoModelForImageClassification

    from leanserve.artifact import TensorSpec
    from leanserve.from_torch import export
    from leanserve.pipeline import PipelineSpec
    from leanserve.pipeline.image import spec_from_preprocessor

    if not (folder / "preprocessor_config.json").is_file():
        raise InvalidInput(f"{folder}: an image classifier needs preprocessor_config.json (resize, crop, normalization)")
    preprocessor = _json(folder / "preprocessor_config.json")
    model = AutoModelForImageClassification.from_pretrained(str(folder), attn_implementation="eager",
                                                            local_files_only=True).eval()
    channels = int(getattr(model.config, "num_channels", 3))
    size = int(getattr(model.config, "image_size", 224))
    example = torch.rand(2, channels, size, size)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    export(Logits().eval(), example, stage / "model.onnx", input_names=["pixel_values"], output_names=["logits"],
           exporter="torchscript", tolerance=1e-3)
    image = spec_from_preprocessor(preprocessor, TensorSpec("pixel_values", "FP32", (-1, channels, size, size)))
    post = {"kind": "classify", "labels": _labels(model.config), "top_k": min(5, model.config.num_labels)}
    return PipelineSpec(task, "model.onnx", "onnx", image.to_dict(), post)


def _check(folder: Path, stage: Path, task: str, tolerance: float) -> dict[str, float]:
    """Run the staged pipeline and the library on the same inputs; the figures go into the manifest."""
    from leanserve.runtime import load_file

    session = load_file(stage / "pipeline.json")
    try:
        if task == SENTENCE_EMBEDDING:
            figures = _check_embedding(folder, session)
            ok = figures["check_min_cosine"] >= 1 - tolerance
        else:
            figures = (_check_image if task == IMAGE_CLASSIFICATION else _check_text_classifier)(folder, session)
            ok = figures["check_max_abs_diff"] <= max(tolerance, 1e-4) * 10
    finally:
        session.close()
    if not ok:
        raise ModelLoadError(f"{folder.name}: the exported pipeline differs from the library's own output ({figures}); "
                             "not imported")
    log.info("checked against the library: %s", figures)
    return figures


def _check_embedding(folder: Path, session) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    texts = np.array([s.encode() for s in CHECK_SENTENCES], dtype=object)
    ours = session.run({"text": texts})["embedding"].astype(np.float64)
    if (folder / "modules.json").is_file():
        theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(list(CHECK_SENTENCES))
    else:
        from transformers import pipeline

        features = pipeline("feature-extraction", model=str(folder), device="cpu")
        theirs = np.stack([np.asarray(f)[0].mean(axis=0) for f in features(list(CHECK_SENTENCES))])
    theirs = np.asarray(theirs, dtype=np.float64)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    return {"check_min_cosine": float(cosine.min()), "check_inputs": len(CHECK_SENTENCES)}


def _check_text_classifier(folder: Path, session) -> dict[str, float]:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), device="cpu", top_k=None)
    texts = np.array([s.encode() for s in CHECK_SENTENCES], dtype=object)
    ours = session.run({"text": texts})
    labels = session.post.labels
    worst = 0.0
    for row, scored in enumerate(classify(list(CHECK_SENTENCES))):
        theirs = {d["label"]: d["score"] for d in scored}
        worst = max(worst, max(abs(theirs[l] - float(ours["probabilities"][row, i])) for i, l in enumerate(labels)))
    return {"check_max_abs_diff": worst, "check_inputs": len(CHECK_SENTENCES)}


def _check_image(folder: Path, session) -> dict[str, float]:
    import io

    from PIL import Image
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folder), device="cpu", top_k=None)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 48), (40, 80))]
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    ours = session.run({"image": np.array(blobs, dtype=object)})
    labels = session.post.labels
    worst = 0.0
    for row, scored in enumerate(classify(images)):
        theirs = {d["label"]: d["score"] for d in scored}
        worst = max(worst, max(abs(theirs[l] - float(ours["probabilities"][row, i])) for i, l in enumerate(labels)))
    return {"check_max_abs_diff": worst, "check_inputs": len(images)}
