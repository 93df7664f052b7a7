"""Reading and checking config values: the helpers every config class validates itself with.

``from_dict`` builds a config dataclass from a mapping and refuses unknown keys by name, so a typo never
passes silently; ``_check`` and ``_check_number`` raise ``InvalidInput`` naming the setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from leanserve.errors import InvalidInput

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and turning lists into tuples."""
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidInput(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(names))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidInput(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)


_VERSION_TEXT = re.compile(r"[0-9]+")


def is_version_text(value: Any) -> bool:
    """True for an int >= 1 or a string of ASCII digits naming one. ``str.isdigit`` is not enough: it
    accepts '²' and other Unicode digits that ``int()`` then refuses."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return isinstance(value, str) and _VERSION_TEXT.fullmatch(value) is not None and int(value) >= 1


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise InvalidInput(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(value: Any, where: str, expected: str, *, above: float | None = None,
                  at_least: float | None = None, at_most: float | None = None) -> None:
    """Raise InvalidInput naming ``where`` unless ``value`` is a finite real number within the bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    _check(ok, where, f"expected {expected}, got {value!r}")
