"""Reference profiles stored beside a model's versions: ``REPO/<model>/.profiles/<version>.json``.

A version folder is immutable once written, so the profile of its inputs and outputs (built from
evaluation or calibration data, possibly later) lives next to it, not inside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from leanserve.repository import Repository, VersionRef

PROFILES_DIR = ".profiles"


def profile_path(repo: Repository, name: str, version: int) -> Path:
    return repo.root / name / PROFILES_DIR / f"{version}.json"


def build_reference(repo: Repository, name: str, version: int | str | None, data: Mapping[str, np.ndarray]):
    """Run ``data`` through the version, profile what drift watches of its inputs and outputs
    (``watched.py``: a text model's embedding or probabilities and token counts, not its text), store the
    profile; returns it. Raises InvalidInput when the data does not fit or nothing can be watched."""
    from leanserve.errors import InvalidInput
    from leanserve.measure import run_all
    from leanserve.model import load
    from leanserve.monitor.profile import build_profile
    from leanserve.monitor.watched import watched

    model = load(name, version, repo=repo)
    inputs = {n: np.asarray(data[n]) for n in model.signature.input_names}
    model.signature.validate_inputs({n: a[:1] for n, a in inputs.items()})
    outputs = run_all(model.session, inputs)
    arrays = watched(model.signature, {**inputs, **outputs})
    if not arrays:
        raise InvalidInput(f"{name}: none of its inputs or outputs is numeric, so there is nothing to watch for drift")
    profile = build_profile(arrays)
    ref = model.ref or VersionRef(name, int(version))
    path = profile_path(repo, ref.name, ref.version)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return profile


def load_reference(repo: Repository, name: str, version: int):
    """The stored profile of a version, or None when it has none."""
    from leanserve.monitor.profile import Profile

    path = profile_path(repo, name, version)
    return Profile.from_json(path.read_text(encoding="utf-8")) if path.is_file() else None
