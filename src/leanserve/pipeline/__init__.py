"""Pre- and post-processing stages around a model: text in (Hugging Face ``tokenizers``), images in
(Pillow), embeddings, labels and scores out.

A pipeline version holds ``pipeline.json`` (this module's ``PipelineSpec``) beside the inner model and the
stages' files (``tokenizer.json``, ``labels.json``), all checksummed in the version's manifest. The
``pipeline`` engine (``leanserve.runtime.pipeline``) serves it: its signature takes V2 BYTES and its
``run`` tokenizes or decodes, runs the inner model and post-processes, on the batcher's worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanserve.artifact import Signature, TensorSpec
from leanserve.errors import ModelLoadError

TEXT, IMAGE = "text", "image"  # the user-facing input's name, by the input stage's kind
TOKEN_COUNT = "token_count"

SPEC_FILE = "pipeline.json"
SPEC_KIND = "leanserve.pipeline/v1"
TASKS = ("sentence-embedding", "text-classification", "image-classification")


@dataclass(frozen=True)
class PipelineSpec:
    """The contents of ``pipeline.json``.

    ``pre`` is the input stage: ``{"kind": "text", "tokenizer": FILE, "max_length": N, "truncate": bool}``
    or ``{"kind": "image", ...}`` (see ``pipeline.image.ImageSpec``). ``post`` is the output stage:
    ``{"kind": "pool", "mode": "mean"|"cls", "normalize": bool}`` or ``{"kind": "classify",
    "labels": [...], "top_k": k}``. ``files`` are the stages' own files, beside the spec.
    """

    task: str
    model_file: str  # the inner model, beside the spec
    model_format: str
    pre: Mapping[str, Any]
    post: Mapping[str, Any]
    files: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names of a classifier's output stage, by class index (``id2label`` or a labels file at
        import); empty for other stages."""
        if self.post.get("kind") != "classify":
            return ()
        return tuple(str(label) for label in self.post.get("labels") or ())

    def to_json(self) -> str:
        return json.dumps({"kind": SPEC_KIND, "task": self.task, "model_file": self.model_file,
                           "model_format": self.model_format, "pre": dict(self.pre), "post": dict(self.post),
                           "files": list(self.files), "provenance": dict(self.provenance)}, indent=2)

    @classmethod
    def read(cls, path: str | Path) -> PipelineSpec:
        """Parse ``pipeline.json``; raise ModelLoadError naming what is wrong."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("kind") != SPEC_KIND:
                raise ValueError(f"'kind' must be {SPEC_KIND!r}")
            if data["task"] not in TASKS:
                raise ValueError(f"task must be one of {', '.join(TASKS)}, got {data['task']!r}")
            names = [str(data["model_file"]), *map(str, data.get("files", []))]
            for name in names:
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ValueError(f"{name!r} must be a path inside the version folder")
            return cls(str(data["task"]), names[0], str(data["model_format"]), dict(data["pre"]),
                       dict(data["post"]), tuple(names[1:]), dict(data.get("provenance") or {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{path.name}: not a pipeline spec ({exc})") from exc


def signature_of(spec: PipelineSpec, inner: Signature) -> Signature:
    """The user-facing signature of a pipeline around a model with signature ``inner``: ``text`` or
    ``image`` BYTES in, the post stage's outputs (and ``token_count`` for text) out. Raises ModelLoadError
    for an unknown input stage."""
    from leanserve.pipeline.post import PostStage

    kind = spec.pre.get("kind")
    if kind not in (TEXT, IMAGE):
        raise ModelLoadError(f"pipeline input stage must be text or image, got {kind!r}")
    outputs = PostStage(spec.post).outputs()
    if kind == TEXT:  # tokens per text, special tokens included: usage counts, and what was cut
        outputs = (*outputs, TensorSpec(TOKEN_COUNT, "INT64", (-1,)))
    return Signature((TensorSpec(kind, "BYTES", (-1,)),), outputs)
