"""A versioned model repository on the local filesystem: ``REPO/<model>/<version>/``.

Versions are integers and immutable once written. Every write is built in a staging folder inside
the model's folder and renamed into place under the model's lock, so a half-written version is never
visible, and a crash leaves only a staging folder that the next write sweeps away. The model's
``config.json`` (version policy, runtime, batching, cache, traffic) is replaced atomically too.

Version numbers are never reused: each model keeps the highest number it ever gave out in
``.last-version`` (written atomically before the version appears), so removing the newest version and
importing another within a server's poll interval gives the new one a new number.

Registering a version is not deploying it. Which versions serve is recorded in the model's traffic
settings; ``state`` names each version's lifecycle state (registered, serving, canary, shadow, retired).

Beside this module: ``files`` (names, version numbers, atomic writes) and ``states`` (lifecycle states,
promotion, the versions a server loads), whose ``VersionStates`` is ``Repository``'s base.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from leanserve.artifact import MANIFEST_FILE, Manifest, ModelArtifact, Provenance, TensorSpec, sha256_file
from leanserve.config import ModelConfig
from leanserve.errors import CorruptArtifact, InvalidInput, ModelNotFound
from leanserve.formats import read_model
from leanserve.repository.files import (
    _NAME, CONFIG_FILE, LAST_VERSION_FILE, LOCK_FILE, STAGING_DIR, VersionRef, _fsync, _fsync_dir, _sweep_stale,
    _write_atomic, is_version_folder, parse_version, validate_name,
)
from leanserve.repository.states import EDGE_FORMATS, STATES, VersionStates, versions_to_load

__all__ = [
    "CONFIG_FILE", "EDGE_FORMATS", "LAST_VERSION_FILE", "LOCK_FILE", "STAGING_DIR", "STATES", "Repository",
    "VersionRef", "is_version_folder", "parse_version", "validate_name", "versions_to_load",
]


class Repository(VersionStates):
    """Versioned model folders under ``root``. Safe for several processes writing at once."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInput(f"repository {self.root} is a file, not a folder")
        if not self.root.exists():
            if not create:
                raise ModelNotFound(f"repository {self.root} does not exist")
            self.root.mkdir(parents=True)

    # --- reading ----------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models in the repository (folders with a valid name; junk is ignored)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and ".." not in p.name)

    def versions(self, name: str) -> list[int]:
        """The versions of ``name``, ascending. Raises ModelNotFound for an unknown model."""
        folder = self._model_dir(name)
        return sorted(
            int(p.name) for p in folder.iterdir()
            if is_version_folder(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file()
        )

    def get(self, name: str, version: int | str | None = None, *, verify: bool = True) -> ModelArtifact:
        """Open one version (the newest if ``version`` is None), checking checksums if ``verify``.

        Raises ModelNotFound for an unknown model/version and CorruptArtifact for damaged files.
        """
        ref = self.resolve(name, version)
        return ModelArtifact.open(self._model_dir(ref.name) / str(ref.version), verify=verify)

    def resolve(self, name: str, version: int | str | None = None) -> VersionRef:
        """Turn a name and optional version into a VersionRef that exists.

        No version means the version serving most traffic (``serving``); ``"latest"`` the newest.
        Raises ModelNotFound or InvalidName.
        """
        available = self.versions(name)
        if version is None or str(version) in ("", "latest"):
            if not available:
                raise ModelNotFound(f"model {name!r} has no versions")
            if version is None or version == "":
                served = self._serving(name, self.config(name), available)
                if served is not None:
                    return VersionRef(name, served)
            return VersionRef(name, available[-1])
        number = parse_version(version)
        if number not in available:
            have = ", ".join(map(str, available)) or "none"
            raise ModelNotFound(f"model {name!r} has no version {number} (versions: {have})")
        return VersionRef(name, number)

    def manifest_digest(self, name: str, version: int) -> str:
        """SHA-256 of a version's manifest (which holds every file's checksum): the version's identity,
        so a number whose folder was replaced is seen as a different model. Raises OSError if unreadable."""
        return hashlib.sha256((self.root / name / str(version) / MANIFEST_FILE).read_bytes()).hexdigest()

    def config(self, name: str) -> ModelConfig:
        """The model's settings (defaults when it has no config file)."""
        path = self._model_dir(name) / CONFIG_FILE
        if not path.is_file():
            return ModelConfig()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptArtifact(f"{path}: unreadable model config ({exc})") from exc
        return ModelConfig.from_dict(data, where=str(path))

    # --- writing ----------------------------------------------------------------------------------

    def add(
        self,
        model_file: str | Path,
        name: str,
        *,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] | None = None,
        provenance: Provenance | None = None,
        metrics: Mapping[str, Any] | None = None,
        runtime: str | None = None,
        check_load: bool = True,
        attachments: Sequence[Path] = (),
        serve: bool | None = None,
    ) -> VersionRef:
        """Import a model file as the next version of ``name`` and return its VersionRef.

        ``serve``: True moves all traffic to the new version, False only registers it (derived versions),
        None follows the model's ``lifecycle.on_import``. A model's first version always serves.

        The signature is read from the model (ONNX, torch.export, OpenVINO) or taken from
        ``inputs``/``outputs``. With ``check_load`` the model is loaded by its runtime first, so a
        file the engine rejects never becomes a version. ``attachments`` (e.g. an optimization report)
        are stored in the version folder and checksummed with it. Raises InvalidName, InvalidInput,
        UnsupportedFormat or ModelLoadError; on any failure the repository is unchanged.
        """
        validate_name(name)
        source = read_model(model_file, inputs, outputs)
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        with self._locked(name), self._staging(name) as stage:
            files: dict[str, str] = {}
            base = source.model_file.resolve().parent
            for src in (source.model_file.resolve(), *source.extra_files):
                rel = src.relative_to(base)
                dest = stage / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                _fsync(dest)
                files[rel.as_posix()] = sha256_file(dest)
            for extra in attachments:
                extra = Path(extra)
                if extra.name in files or extra.name == MANIFEST_FILE:
                    raise InvalidInput(f"attachment {extra.name!r} clashes with a model file")
                shutil.copyfile(extra, stage / extra.name)
                files[extra.name] = sha256_file(stage / extra.name)
            prov = provenance or Provenance()
            if prov.source is None:
                prov = replace(prov, source=str(Path(model_file).resolve()))
            size = sum((stage / rel).stat().st_size for rel in files)
            manifest = Manifest(
                format=source.format,
                model_file=source.model_file.name,
                signature=source.signature,
                files=files,
                provenance=prov,
                metrics={"size_bytes": size, **dict(metrics or {})},
                runtime=runtime,
            )
            (stage / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
            _fsync(stage / MANIFEST_FILE)
            if check_load:
                from leanserve.runtime import check_runs, load_session

                session = load_session(ModelArtifact(stage, manifest), self.config(name).runtime)
                check_runs(session)
                session.close()
            version = self._next_version(folder)
            before = self.versions(name)
            os.rename(stage, folder / str(version))
            _fsync_dir(folder)
            self._settle_traffic(name, version, before, serve)
        return VersionRef(name, version)

    def _next_version(self, folder: Path) -> int:
        """One above every number the model ever used (the high-water mark and the folders), recorded
        before the folder appears, so a crash in between skips a number rather than reusing one."""
        mark = folder / LAST_VERSION_FILE
        try:
            last = int(mark.read_text(encoding="ascii").strip())
        except (OSError, ValueError):  # no mark yet (or a damaged one): the folders still bound it
            last = 0
        existing = [int(p.name) for p in folder.iterdir() if is_version_folder(p.name)]
        version = max([last, *existing]) + 1
        _write_atomic(mark, str(version))
        return version

    def remove(self, name: str, version: int | str) -> VersionRef:
        """Delete one version. It disappears atomically (renamed away first), then its files go."""
        ref = self.resolve(name, version)
        with self._locked(name):
            trash = self._model_dir(name) / STAGING_DIR / f"rm-{ref.version}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(exist_ok=True)
            os.rename(self._model_dir(name) / str(ref.version), trash)
            shutil.rmtree(trash, ignore_errors=True)
        return ref

    def set_config(self, name: str, config: ModelConfig) -> None:
        """Replace the model's settings atomically."""
        folder = self._model_dir(name)
        with self._locked(name):
            _write_atomic(folder / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))

    def update_config(self, name: str, **changes: Any) -> ModelConfig:
        """Read-modify-write the model's settings under its lock; returns the new config."""
        folder = self._model_dir(name)
        with self._locked(name):
            config = self.config(name).replace(**changes)
            _write_atomic(folder / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
        return config

    # --- internals --------------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            known = ", ".join(self.models()) or "none"
            raise ModelNotFound(f"no model named {name!r} in {self.root} (models: {known})")
        return folder

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        # An advisory lock serialises writers (several CLI processes, the server's admin API).
        with open(self.root / name / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _staging(self, name: str) -> Iterator[Path]:
        staging = self.root / name / STAGING_DIR
        staging.mkdir(exist_ok=True)
        _sweep_stale(staging)
        stage = staging / f"add-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            yield stage
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
