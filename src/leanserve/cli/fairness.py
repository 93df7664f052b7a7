"""The ``leanserve mitigate`` command: a fairness post-processing of a served model as a new version."""

from __future__ import annotations

from pathlib import Path

from leanserve.errors import InvalidInput


def cmd_mitigate(args) -> int:
    try:
        from leanserve.fairness.mitigate import mitigate
        import fairlearn  # noqa: F401  (checked here to name the extra)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("fairlearn", "sklearn", "pandas"):
            raise InvalidInput(f"leanserve mitigate needs Fairlearn ({exc.name} is not installed): "
                               "pip install 'leanserve[fairness]'") from None
        raise
    from leanserve.repository import Repository

    report = mitigate(Repository(args.repo, create=False), args.model, group_parameter=args.group_param,
                      constraint=args.constraint, db=Path(args.db) if args.db else None, version=args.version,
                      folds=args.folds, min_per_group=args.min_per_group, canary=not args.no_canary)
    print(report.to_text())
    return 0


def add_mitigate_command(sub, command, add_repo) -> None:
    """Add ``leanserve mitigate`` to the main parser."""
    p = command(sub, "mitigate", cmd_mitigate,
                "fit Fairlearn's ThresholdOptimizer on a served model's labelled feedback and register a new version "
                "that post-processes its decisions per group (read from a request parameter), as a guarded canary",
                "leanserve mitigate credit --group-param group --constraint equalized_odds")
    p.add_argument("model", metavar="MODEL", help="model whose served version (the primary) is mitigated")
    p.add_argument("--group-param", default="group", metavar="NAME",
                   help="request parameter that carries each request's group in the new version; the fit reads groups "
                        "from the prediction log, which records the parameter 'group'")
    p.add_argument("--constraint", choices=("demographic_parity", "equalized_odds"), default="demographic_parity",
                   help="what to equalize across groups: selection rates, or true and false positive rates")
    p.add_argument("--version", type=int, default=None, help="version to mitigate; the primary when not given")
    p.add_argument("--db", default=None, metavar="PATH", help="prediction log; REPO/.monitor/predictions.db when not given")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds for the held-out report")
    p.add_argument("--min-per-group", type=int, default=30, metavar="N",
                   help="labelled predictions each group needs (with both labels)")
    p.add_argument("--no-canary", action="store_true", help="register the version without starting a guarded canary")
    add_repo(p)
