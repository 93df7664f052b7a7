"""What a deployment image carries besides manifests: a wheel of this leanserve checkout, and the versions
a server would load from the repository (with their reference profiles).

The wheel is built with ``pip wheel --no-deps --no-build-isolation`` from a copy of the checkout (so the
build leaves nothing in the working tree), offline: the build backend is the one already installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from leanserve import __version__
from leanserve.errors import InvalidInput

_BUILT: dict[tuple, Path] = {}  # source fingerprint -> wheel built by this process


def checkout_root() -> Path | None:
    """The source checkout leanserve runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "leanserve").is_dir() else None


def wheel_name() -> str:
    """The file name of this version's wheel."""
    return f"leanserve-{__version__}-py3-none-any.whl"


def build_wheel(dest: Path) -> Path:
    """Build a wheel of the checkout into ``dest``; returns its path. Rebuilt only when a source file
    changed since this process last built one.

    Raises InvalidInput, saying how to provide the wheel, when leanserve is not run from a checkout or
    the build fails."""
    root = checkout_root()
    if root is None:
        raise InvalidInput(f"leanserve {__version__} is installed, not run from a source checkout, so no wheel can be "
                           f"built: put {wheel_name()} (from `pip wheel CHECKOUT --no-deps -w DIR`) in the bundle's "
                           "wheels/ folder and run again")
    key = _fingerprint(root)
    if key not in _BUILT or not _BUILT[key].is_file():
        _BUILT[key] = _build(root, Path(tempfile.mkdtemp(prefix="leanserve-wheel-")))
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(_BUILT[key], dest / _BUILT[key].name))


def _fingerprint(root: Path) -> tuple:
    files = [root / "pyproject.toml", *sorted((root / "src").rglob("*"))]
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files
                 if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p))


def _build(root: Path, out: Path) -> Path:
    source = out / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(root / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).is_file():
            shutil.copy2(root / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
               "--quiet", "-w", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    wheels = sorted(out.glob("leanserve-*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise InvalidInput(f"building the leanserve wheel failed ({reason}); build it yourself with "
                           f"`pip wheel {root} --no-deps -w DIR` and put it in the bundle's wheels/ folder")
    shutil.rmtree(source, ignore_errors=True)
    return wheels[-1]


def copy_served(repo: Path, dest: Path) -> dict[str, list[int]]:
    """Copy into ``dest`` what a server started on ``repo`` loads: each model's settings, the versions it
    would load (``versions_to_load``: traffic, shadow, version policy) whole, pipeline files included, and
    their reference profiles. Runtime state (locks, staging, the prediction log, rollout events) and
    versions no server would load stay behind. Returns the versions copied, per model."""
    from leanserve.monitor.reference import PROFILES_DIR
    from leanserve.repository import CONFIG_FILE, Repository, versions_to_load

    repository = Repository(repo, create=False)
    copied = {}
    for name in repository.models():
        config = repository.config(name)
        versions = sorted(versions_to_load(repository, name, config, repository.versions(name)))
        if not versions:
            continue
        source, target = repo / name, dest / name
        target.mkdir(parents=True)
        if (source / CONFIG_FILE).is_file():
            shutil.copy2(source / CONFIG_FILE, target / CONFIG_FILE)
        for version in versions:
            shutil.copytree(source / str(version), target / str(version),
                            ignore=lambda _, names: [n for n in names if n.startswith(".")])
            profile = source / PROFILES_DIR / f"{version}.json"
            if profile.is_file():
                (target / PROFILES_DIR).mkdir(exist_ok=True)
                shutil.copy2(profile, target / PROFILES_DIR / profile.name)
        copied[name] = versions
    return copied


def write_bundle(out: Path, texts: Mapping[str, str], repo: Path | None) -> list[Path]:
    """Write ``texts`` (file name -> content), a leanserve wheel in ``wheels/`` and, when ``repo`` is given,
    its served versions in ``models/`` into the folder ``out``.

    Everything is written into a sibling folder and renamed into place, so ``out`` is either the old
    bundle or the new one, never a mix; wheels a user put in a previous bundle's ``wheels/`` are kept.
    Raises InvalidInput when ``out`` is a file or holds files this command did not write, or when no
    leanserve wheel can be built or found. Returns the paths written, relative to ``out``.
    """
    _check_out(out, {*texts, "models", "wheels"})
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        _fill(staging, texts, repo, out)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _check_out(out: Path, ours: set[str]) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out}: a file is in the way; give a new or empty folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if foreign:
            raise InvalidInput(f"--out {out} holds files this command did not write ({', '.join(foreign[:5])}); "
                               "give a new or empty folder")


def _fill(folder: Path, texts: Mapping[str, str], repo: Path | None, out: Path) -> None:
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    wheels = folder / "wheels"
    wheels.mkdir()
    for wheel in (out / "wheels").glob("*.whl") if (out / "wheels").is_dir() else ():
        shutil.copy2(wheel, wheels / wheel.name)  # a user's own wheels stay
    if checkout_root() is not None or not (wheels / wheel_name()).is_file():
        build_wheel(wheels)
    if repo is not None:
        copy_served(repo, folder / "models")


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)  # put the previous bundle back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)
