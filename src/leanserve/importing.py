"""Importing a model file as a version, with the typical inputs its drift checks compare traffic against.

The data is read and checked against the model's signature before the version exists, so bad data
never leaves a version behind without its profile.
"""

from __future__ import annotations

from pathlib import Path

from leanserve.repository import Repository, VersionRef


def import_model(repo: Repository, model_file: str | Path, name: str, *, reference_data: str | Path | None = None,
                 **add_options) -> tuple[VersionRef, int]:
    """Import ``model_file`` as the next version of ``name`` (``add_options`` go to ``Repository.add``) and,
    given ``reference_data`` (a .npz of typical inputs), store its reference profile.

    Returns (the new version, rows profiled: 0 without data). Raises InvalidInput for unusable data
    (before anything is imported) and what ``Repository.add`` raises.
    """
    from leanserve.formats import read_model
    from leanserve.optimize.run import load_data

    data = None
    if reference_data is not None:
        signature = read_model(model_file, add_options.get("inputs"), add_options.get("outputs")).signature
        data = load_data(reference_data, signature, "reference")
    ref = repo.add(model_file, name, **add_options)
    if data is None:
        return ref, 0
    from leanserve.monitor.reference import build_reference

    try:
        build_reference(repo, ref.name, ref.version, data)
    except BaseException:  # the data passed the checks but the model refused it: the import is undone
        repo.remove(ref.name, ref.version)
        raise
    return ref, len(next(iter(data.values())))
