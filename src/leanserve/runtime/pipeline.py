"""Pipeline engine: a text or image model served with its pre- and post-processing (``leanserve.pipeline``).

The version's signature is the user's: ``text`` or ``image`` as V2 BYTES [-1] in; an ``embedding``, or
``label``/``probabilities``/``top_labels``/``top_scores`` out (and, for text, ``token_count``). ``run`` tokenizes (or decodes) the whole
batch, pads it to its longest member, runs the inner model with its own engine and post-processes, all on
the batcher's worker thread. ``admit`` is the batcher's cheap per-request check before queueing, so a bad
text or image is that request's 400, never a failed batch; it returns the request's length in tokens for
token-budget batching.

The raw-tensor model stays reachable: ``leanserve import`` of a Hugging Face folder also registers the
inner model alone as ``NAME-tensors``, for clients that tokenize themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import numpy as np

from leanserve.artifact import Manifest, ModelArtifact, Signature, TensorSpec
from leanserve.errors import InvalidInput, ModelLoadError
from leanserve.pipeline import TEXT, TOKEN_COUNT, PipelineSpec
from leanserve.pipeline.post import PostStage

class PipelineSession:
    """Pre-processing, the inner model's session, post-processing."""

    engine = "pipeline"

    def __init__(self, inner, spec: PipelineSpec, folder, signature: Signature) -> None:
        self._inner = inner
        self.spec = spec
        self.signature = signature
        self.input_name = signature.inputs[0].name
        self.post = PostStage(spec.post)
        self._model_output = inner.signature.output_names[0]
        if self.input_name == TEXT:
            from leanserve.pipeline.text import TextSpec, TextStage

            self.text = TextStage(folder, TextSpec.from_dict(spec.pre))
            self.image = None
        else:
            from leanserve.pipeline.image import ImageSpec, ImageStage

            self.text = None
            self.image = ImageStage(ImageSpec.from_dict(spec.pre))
            self._image_input = inner.signature.input_names[0]

    @property
    def inner(self):
        """The wrapped model's session (raw tensors in and out)."""
        return self._inner

    def admit(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Check one request before it is queued (UTF-8, empty, too long; image headers and sizes) and
        return its length in tokens (1 for images). Raises InvalidInput naming the row and the problem."""
        items = inputs[self.input_name]
        if self.text is not None:
            return self.text.check(self.input_name, items)
        self.image.check(self.input_name, items)
        return 1

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        items = np.asarray(inputs[self.input_name])
        mask = None
        if self.text is not None:
            # requests' empty texts were refused by admit(); warm-up runs send empty ones
            encoded = self.text.encode(self.text.texts(self.input_name, items, allow_empty=True))
            feed, mask = encoded.tensors, encoded.tensors["attention_mask"]
        else:
            feed = {self._image_input: self.image(self.input_name, items)}
        result = self.post(self._inner.run(feed, [self._model_output])[self._model_output], mask)
        if self.text is not None:
            result[TOKEN_COUNT] = encoded.lengths.astype(np.int64)
        return {name: result[name] for name in (outputs or self.signature.output_names)}

    def close(self) -> None:
        self._inner.close()


def inner_artifact(artifact: ModelArtifact) -> ModelArtifact:
    """The inner model of a pipeline version as an artifact its own engine loads (checksums were
    verified with the version). Raises ModelLoadError for an unreadable spec or model."""
    from leanserve.formats import read_model

    spec = PipelineSpec.read(artifact.model_path)
    source = read_model(artifact.path / spec.model_file)
    return ModelArtifact(artifact.path, Manifest(spec.model_format, spec.model_file, source.signature, {}))


def wrap(inner, artifact: ModelArtifact) -> PipelineSession:
    """The version's session around ``inner``, the session of its ``inner_artifact``: loads the stages.
    Raises ModelLoadError (or InvalidInput for a stage's bad settings)."""
    return PipelineSession(inner, PipelineSpec.read(artifact.model_path), artifact.path, artifact.signature)
