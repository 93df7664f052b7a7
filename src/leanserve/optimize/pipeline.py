"""Optimizing a pipeline version (a model inside its tokenizer or image stage and its output stage).

The search rewrites the inner ONNX model only, but judges every candidate on the user's data and the
user's answers: the evaluation data holds texts (or image bytes), each candidate runs inside the
version's own stages, and its quality is that of the output the user reads (a text classifier's
``probabilities`` against the labels, or an encoder's ``embedding`` by its cosine to the original's).
So an int8 pick is judged on texts, padded as the server pads them. Static int8 calibrates on the
token (or pixel) tensors the stages make of the calibration texts. The chosen variant is registered as
a pipeline version again: the parent's ``pipeline.json`` and stage files, byte for byte, around the new model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.errors import UnsupportedFormat
from leanserve.pipeline import SPEC_FILE, PipelineSpec
from leanserve.repository import Repository, VersionRef


@dataclass(frozen=True)
class PipelineTarget:
    """A pipeline version to optimize: its spec, its inner model and the output candidates are judged on."""

    artifact: ModelArtifact
    spec: PipelineSpec
    inner: ModelArtifact
    judged: str  # the user-facing output quality is measured on

    @property
    def model_path(self) -> Path:
        return self.inner.model_path

    @property
    def inner_signature(self) -> Signature:
        return self.inner.signature


def pipeline_target(artifact: ModelArtifact) -> PipelineTarget:
    """The pipeline version ``artifact`` as a search target. Raises UnsupportedFormat when its inner model
    is not ONNX, ModelLoadError for an unreadable spec."""
    from leanserve.runtime.pipeline import inner_artifact

    spec = PipelineSpec.read(artifact.model_path)
    if spec.model_format != "onnx":
        raise UnsupportedFormat(f"optimize works on pipelines around ONNX models; this one holds {spec.model_format}")
    judged = next(s.name for s in artifact.signature.outputs if s.datatype.startswith("FP"))
    return PipelineTarget(artifact, spec, inner_artifact(artifact), judged)


def stage_inputs(target: PipelineTarget, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inner model's inputs the version's stages make of ``data`` (texts tokenized and padded to the
    longest, or images decoded and normalized): what static int8 calibrates on."""
    from leanserve.runtime import load_session

    session = load_session(target.artifact)
    try:
        items = np.asarray(data[session.input_name])
        if session.text is not None:
            return session.text.encode(session.text.texts(session.input_name, items)).tensors
        return {target.inner_signature.input_names[0]: session.image(session.input_name, items)}
    finally:
        session.close()


def judging_wrapper(target: PipelineTarget) -> Callable:
    """A function that puts a candidate's inner session inside the version's stages, answering only the
    judged output (the search's quality metrics read the first output)."""
    from leanserve.runtime.pipeline import PipelineSession

    user = target.artifact.signature
    signature = Signature(user.inputs, tuple(s for s in user.outputs if s.name == target.judged))
    return lambda inner: PipelineSession(inner, target.spec, target.artifact.path, signature)


def register_pipeline(repo: Repository, name: str, target: PipelineTarget, model_file: Path,
                      model_format: str | None = None, **add_options) -> VersionRef:
    """Register ``model_file`` (the chosen inner model) inside the parent version's pipeline: the same stage
    files, checksummed in the new version's manifest. The parent's ``pipeline.json`` is kept byte for byte,
    or, when ``model_format`` differs from the parent's (an ORT-format edge artifact), rewritten to name the
    new file (the parent's model name with ``model_file``'s suffix) and format. ``add_options`` go to
    ``Repository.add``."""
    spec = target.spec
    if model_format is not None and model_format != spec.model_format:
        moved = PurePosixPath(spec.model_file).with_suffix(Path(model_file).suffix).as_posix()
        spec = replace(spec, model_file=moved, model_format=model_format)
    with tempfile.TemporaryDirectory(prefix="leanserve-pipeline-") as tmp:
        stage = Path(tmp)
        for rel in (SPEC_FILE, *spec.files):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target.artifact.path / rel, stage / rel)
        if spec is not target.spec:
            (stage / SPEC_FILE).write_text(spec.to_json(), encoding="utf-8")
        (stage / spec.model_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, stage / spec.model_file)
        return repo.add(stage / SPEC_FILE, name, **add_options)
