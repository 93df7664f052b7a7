"""The ``leanserve mitigate`` command: a fairness post-processing of a served model as a new version."""

from __future__ import annotations

from pathlib import Path

from leanserve.cli.args import add_force, add_json, add_repo, command, config_default, given, needs_extra, open_repo, print_json

MITIGATE = "leanserve.fairness.mitigate:mitigate"


def cmd_mitigate(args) -> int:
    with needs_extra("mitigate", "fairness", "fairlearn", "sklearn", "pandas"):
        from leanserve.fairness.mitigate import mitigate
        import fairlearn  # noqa: F401  (checked here to name the extra)
    report = mitigate(open_repo(args), args.model, db=Path(args.db) if args.db else None, version=args.version,
                      canary=not args.no_canary, force=args.force,
                      **given(args, group_parameter="group_param", constraint="constraint", folds="folds",
                              min_per_group="min_per_group"))
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.to_text())
    return 0


def register(sub) -> None:
    """Add mitigate."""
    p = command(sub, "mitigate", cmd_mitigate,
                "fit Fairlearn's ThresholdOptimizer on a served model's labelled feedback and register a new version "
                "that post-processes its decisions per group (read from a request parameter), as a guarded canary; "
                "the model must be a binary classifier",
                "leanserve mitigate credit --group-param group --constraint equalized_odds")
    p.add_argument("model", metavar="MODEL", help="model whose served version (the primary) is mitigated")
    config_default(p.add_argument("--group-param", metavar="NAME",
                   help="request parameter that carries each request's group in the new version; the fit reads groups "
                        "from the prediction log, which records the parameter 'group'"), MITIGATE, "group_parameter")
    config_default(p.add_argument("--constraint", choices=("demographic_parity", "equalized_odds"),
                                  help="what to equalize across groups: selection rates, or true and false positive "
                                       "rates"), MITIGATE, "constraint")
    p.add_argument("--version", type=int, help="version to mitigate; the primary when not given")
    p.add_argument("--db", metavar="PATH", help="prediction log; REPO/.monitor/predictions.db when not given")
    config_default(p.add_argument("--folds", type=int, help="cross-fitting folds for the held-out report"),
                   MITIGATE, "folds")
    config_default(p.add_argument("--min-per-group", type=int, metavar="N",
                                  help="labelled predictions each group needs (with both labels)"),
                   MITIGATE, "min_per_group")
    p.add_argument("--no-canary", action="store_true", help="register the version without starting a guarded canary")
    add_force(p, "a mitigation whose held-out gap is not smaller than the served version's")
    add_json(p, "the mitigation report")
    add_repo(p)
