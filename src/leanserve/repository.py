"""A versioned model repository on the local filesystem: ``REPO/<model>/<version>/``.

Versions are integers and immutable once written. Every write is built in a staging folder inside
the model's folder and renamed into place under the model's lock, so a half-written version is never
visible, and a crash leaves only a staging folder that the next write sweeps away. The model's
``config.json`` (version policy, runtime, batching, cache, traffic) is replaced atomically too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from leanserve.artifact import MANIFEST_FILE, Manifest, ModelArtifact, Provenance, TensorSpec, sha256_file
from leanserve.config import ModelConfig
from leanserve.errors import CorruptArtifact, InvalidInput, InvalidName, ModelNotFound, RepositoryError
from leanserve.formats import read_model

CONFIG_FILE = "config.json"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe model name (letters, digits, ``_ . -``; no paths); else raise InvalidName."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise InvalidName(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def parse_version(version: str | int) -> int:
    """Return a version as a positive int; raise InvalidName for anything else."""
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise InvalidName(f"invalid version {version!r}: versions are integers >= 1")
    return int(text)


@dataclass(frozen=True, order=True)
class VersionRef:
    """One version of one model."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class Repository:
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
            if p.is_dir() and p.name.isdigit() and int(p.name) >= 1 and (p / MANIFEST_FILE).is_file()
        )

    def get(self, name: str, version: int | str | None = None, *, verify: bool = True) -> ModelArtifact:
        """Open one version (the newest if ``version`` is None), checking checksums if ``verify``.

        Raises ModelNotFound for an unknown model/version and CorruptArtifact for damaged files.
        """
        ref = self.resolve(name, version)
        return ModelArtifact.open(self._model_dir(ref.name) / str(ref.version), verify=verify)

    def resolve(self, name: str, version: int | str | None = None) -> VersionRef:
        """Turn a name and optional version into a VersionRef that exists."""
        available = self.versions(name)
        if version is None or str(version) in ("", "latest"):
            if not available:
                raise ModelNotFound(f"model {name!r} has no versions")
            return VersionRef(name, available[-1])
        number = parse_version(version)
        if number not in available:
            have = ", ".join(map(str, available)) or "none"
            raise ModelNotFound(f"model {name!r} has no version {number} (versions: {have})")
        return VersionRef(name, number)

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
    ) -> VersionRef:
        """Import a model file as the next version of ``name`` and return its VersionRef.

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
            existing = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
            version = max(existing, default=0) + 1
            os.rename(stage, folder / str(version))
            _fsync_dir(folder)
        return VersionRef(name, version)

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


def _sweep_stale(staging: Path) -> None:
    """Remove staging folders left by writers that died (their pid no longer runs)."""
    for entry in staging.iterdir():
        parts = entry.name.split("-")
        if len(parts) >= 2 and parts[0] == "add" and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)
