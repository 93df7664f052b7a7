"""What ``--target ort`` converts: a plain ONNX version's model, or a pipeline version's inner model
inside its stages (a text model with its tokenizer, an image model with its preprocessing).

For a pipeline version only the inner ONNX model becomes the ORT-format file; everything else stays.
The int8 search is optimize's on pipeline versions (``optimize.pipeline``): each candidate runs inside
the version's stages on the user's texts, so the pick and the accuracy check are judged on texts,
tokenized and padded as the server does; static int8 calibrates on the token tensors the tokenizer
makes. The device run feeds those token tensors (on a device the tokenizer runs beside the model). The
version registered is a pipeline again: the parent's stage files byte for byte and its pipeline.json
rewritten to name ``model.ort`` (``model_format: ort``), so it loads and serves text like its parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.errors import UnsupportedFormat
from leanserve.measure import file_size
from leanserve.optimize.pipeline import PipelineTarget
from leanserve.repository import Repository, VersionRef

PIPELINE_TARGETS = ("ort",)  # the targets that keep a version's pipeline


@dataclass(frozen=True)
class ConvertedModel:
    """The ONNX model the ORT target converts, and how a candidate file of it is run and judged.

    ``version`` is the repository version; ``path`` and ``signature`` are the ONNX model's own (the
    version's file, or a pipeline's inner model with its token tensors); ``pipeline`` is None for a
    plain ONNX version.
    """

    version: ModelArtifact
    path: Path
    signature: Signature
    pipeline: PipelineTarget | None = None

    def tensors(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's input tensors for rows of version-level ``data``: the rows themselves, or the token
        (pixel) tensors the version's stages make of its texts (images)."""
        rows = {n: data[n] for n in self.version.signature.input_names}
        if self.pipeline is None:
            return rows
        from leanserve.optimize.pipeline import stage_inputs

        return stage_inputs(self.pipeline, rows)

    def load(self, path: Path):
        """A session of the model file ``path`` that answers as the user reads it: the file alone, or inside
        the version's stages answering the judged output. Raises what ``runtime.load_file`` raises."""
        from leanserve.runtime import load_file

        session = load_file(path)
        if self.pipeline is None:
            return session
        from leanserve.optimize.pipeline import judging_wrapper

        return judging_wrapper(self.pipeline)(session)

    def register(self, repo: Repository, name: str, built: Path, *, runtime: str, **add_options) -> VersionRef:
        """Register the built file as the next version of ``name``: the file itself, run by ``runtime``, or
        inside the parent's pipeline with pipeline.json pointing at it (its engine follows its format).
        ``add_options`` go to ``Repository.add``."""
        if self.pipeline is None:
            return repo.add(built, name, runtime=runtime, **add_options)
        from leanserve.formats import detect_format
        from leanserve.optimize.pipeline import register_pipeline

        return register_pipeline(repo, name, self.pipeline, built, model_format=detect_format(built), **add_options)

    def stage_notes(self) -> tuple[str, ...]:
        """What the report's size and device figures leave out for a pipeline version (its stage files)."""
        if self.pipeline is None:
            return ()
        folder = self.version.path
        files = ", ".join(f"{f} ({file_size(folder / f):,} bytes)" for f in self.pipeline.spec.files)
        stage = "tokenizer" if self.pipeline.spec.pre.get("kind") == "text" else "image pre-processing"
        return (f"pipeline version: only the inner model was converted; its stage files travel beside it "
                f"unchanged ({files or 'none'}), and the device run fed the tensors the stages make (a device "
                f"runs the {stage} beside the model); accuracy was judged on "
                f"'{self.pipeline.judged}' inside the version's stages",)


def converted_model(artifact: ModelArtifact, target: str) -> ConvertedModel:
    """The ONNX model ``target`` builds from ``artifact``. Raises UnsupportedFormat for a pipeline version
    and a target that does not keep pipelines, or a pipeline whose inner model is not ONNX."""
    source = f"{artifact.path.parent.name}:{artifact.path.name}"
    if artifact.manifest.format != "pipeline":
        return ConvertedModel(artifact, artifact.model_path, artifact.signature)
    refuse_pipeline(artifact, target)
    from leanserve.optimize.pipeline import pipeline_target

    try:
        pipeline = pipeline_target(artifact)
    except UnsupportedFormat as exc:
        raise UnsupportedFormat(f"--target {target} converts pipelines around ONNX models; {source}: {exc}") from exc
    return ConvertedModel(artifact, pipeline.model_path, pipeline.inner_signature, pipeline)


def refuse_pipeline(artifact: ModelArtifact, target: str) -> None:
    """UnsupportedFormat, in one line naming what is supported, for a pipeline version and a target other
    than ``PIPELINE_TARGETS``."""
    if artifact.manifest.format == "pipeline" and target not in PIPELINE_TARGETS:
        source = f"{artifact.path.parent.name}:{artifact.path.name}"
        raise UnsupportedFormat(
            f"--target {target} does not take pipeline versions; {source} is a model with its pre- and "
            f"post-processing: use --target {' or '.join(PIPELINE_TARGETS)}, which keeps the pipeline, or give a "
            "version of the bare model")
