"""Which version a command acts on when the user names none: the one serving most traffic."""

from __future__ import annotations

import sys

from leanserve.repository import Repository, VersionRef


def subject(repo: Repository, name: str, version: str | int | None) -> VersionRef:
    """The version ``version`` names, or (None or empty) the version serving most of ``name``'s traffic,
    said on stderr so the output stays clean. Raises ModelNotFound or InvalidName."""
    ref = repo.resolve(name, version if version not in ("", None) else None)
    if version in ("", None):
        print(f"using {ref}, the version serving most traffic (name another as {name}:VERSION)", file=sys.stderr)
    return ref
