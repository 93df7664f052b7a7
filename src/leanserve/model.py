"""``leanserve.load``: a model version from a repository (or a version folder), ready to predict."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import MANIFEST_FILE, ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.repository import Repository, VersionRef
from leanserve.runtime import Session, load_session

DEFAULT_REPO = "model-repo"


def default_repo() -> Path:
    """The repository used when none is given: ``$LEANSERVE_REPO`` or ``./model-repo``."""
    return Path(os.environ.get("LEANSERVE_REPO") or DEFAULT_REPO)


@dataclass
class Model:
    """A loaded model version: its artifact, its engine session, and a validated ``predict``."""

    artifact: ModelArtifact
    session: Session
    ref: VersionRef | None = None
    allow_nonfinite: bool = True

    @property
    def signature(self) -> Signature:
        return self.artifact.signature

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the signature and run them; returns named output arrays.

        Raises InvalidInput naming the tensor for a missing/extra input, wrong dtype or shape, or an
        unknown requested output.
        """
        self.signature.validate_inputs(inputs, allow_nonfinite=self.allow_nonfinite)
        if outputs:
            self.signature.check_outputs(outputs)
        return self.session.run(inputs, outputs)


def load(
    name_or_path: str | Path,
    version: int | str | None = None,
    *,
    repo: str | Path | Repository | None = None,
    options: RuntimeOptions | None = None,
) -> Model:
    """Load a model: a name in ``repo`` (newest version unless ``version``), or a version folder path.

    Checksums are verified before the engine sees the files. Raises ModelNotFound, CorruptArtifact,
    UnsupportedFormat or ModelLoadError.
    """
    path = Path(name_or_path)
    if (path / MANIFEST_FILE).is_file():
        artifact = ModelArtifact.open(path)
        return Model(artifact, load_session(artifact, options))
    repository = repo if isinstance(repo, Repository) else Repository(repo or default_repo(), create=False)
    ref = repository.resolve(str(name_or_path), version)
    artifact = repository.get(ref.name, ref.version)
    config = repository.config(ref.name)
    session = load_session(artifact, options or config.runtime)
    return Model(artifact, session, ref, allow_nonfinite=config.allow_nonfinite)
