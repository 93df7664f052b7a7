"""What a repository's folders are called and how they are written: model names, version numbers,
``VersionRef``, and the atomic-write primitives (write-then-rename, fsync, sweeping staging folders left
by writers that died)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from leanserve.config import is_version_text
from leanserve.errors import InvalidName

CONFIG_FILE = "config.json"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
LAST_VERSION_FILE = ".last-version"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe model name (letters, digits, ``_ . -``; no paths); else raise InvalidName."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", "..") or ".." in name:
        raise InvalidName(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def parse_version(version: str | int) -> int:
    """Return a version as a positive int; raise InvalidName for anything else (only ASCII digits count:
    '²' passes ``str.isdigit`` but is no version)."""
    text = version.strip() if isinstance(version, str) else version
    if not is_version_text(text):
        raise InvalidName(f"invalid version {version!r}: versions are integers >= 1 written in ASCII digits")
    return int(text)


def is_version_folder(name: str) -> bool:
    """True when a folder name is a version number (ASCII digits, >= 1)."""
    return is_version_text(name)


@dataclass(frozen=True, order=True)
class VersionRef:
    """One version of one model."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


def _sweep_stale(staging: Path) -> None:
    """Remove staging folders left by writers that died (their pid no longer runs)."""
    for entry in staging.iterdir():
        parts = entry.name.split("-")
        if len(parts) >= 2 and parts[0] == "add" and parts[1].isascii() and parts[1].isdigit() and not _pid_alive(int(parts[1])):
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
