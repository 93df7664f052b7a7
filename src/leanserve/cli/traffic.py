"""Which versions take traffic: ``promote``, ``traffic``, ``canary`` and ``rollback``."""

from __future__ import annotations

import json

from leanserve.cli.args import add_model_ref, add_repo, command, config_default, given, model_ref, open_repo
from leanserve.errors import InvalidInput

ROLLOUT = "leanserve.config:RolloutConfig"


def cmd_promote(args) -> int:
    repo = open_repo(args)
    name, version = model_ref(args)
    if not version:
        raise InvalidInput("say which version to serve: leanserve promote MODEL:VERSION")
    before = repo.serving(name)
    ref = repo.promote(name, version)
    print(f"{ref} now takes all traffic (before: {before or 'nothing'}); a running server applies it within its "
          f"poll interval; undo with: leanserve rollback {name}")
    return 0


def cmd_traffic(args) -> int:
    from leanserve.traffic import set_traffic

    repo = open_repo(args)
    current = repo.config(args.model)
    weights = None
    if args.weights:
        weights = {}
        for part in args.weights.split(","):
            version, sep, weight = part.partition("=")
            if not sep or not (weight.strip().isascii() and weight.strip().isdigit()):
                raise InvalidInput(f"--weights {args.weights!r}: expected VERSION=WEIGHT,..., e.g. 1=90,2=10")
            weights[str(repo.resolve(args.model, version).version)] = int(weight)
    shadow = ("keep" if args.shadow is None else
              None if args.shadow in ("none", "off") else repo.resolve(args.model, args.shadow).version)
    traffic = set_traffic(current.traffic, weights, shadow)
    repo.update_config(args.model, traffic=traffic)
    print(json.dumps({"weights": dict(traffic.weights), "shadow": traffic.shadow}))
    return 0


def cmd_rollback(args) -> int:
    from leanserve.traffic import rollback

    repo = open_repo(args)
    traffic, target = rollback(repo.config(args.model).traffic, repo.versions(args.model))
    repo.update_config(args.model, traffic=traffic)
    print(f"{args.model}: all traffic now goes to version {target} (a running server applies it within its poll interval)")
    return 0


def cmd_canary(args) -> int:
    from leanserve.repository import parse_version
    from leanserve.traffic import start_rollout

    repo = open_repo(args)
    settings = given(args, step_interval_s="interval", min_requests="min_requests", max_p99_ratio="max_p99_ratio")
    if args.steps:
        try:
            settings["steps"] = tuple(int(p) for p in args.steps.split(","))
        except ValueError:
            raise InvalidInput(f"--steps {args.steps!r}: expected percentages, e.g. 5,25,50,100") from None
    rollout = start_rollout(repo, args.model, parse_version(args.version), **settings)
    print(f"{args.model}: guarded canary of version {rollout.canary} against {rollout.primary}, steps "
          f"{'/'.join(map(str, rollout.steps))}% every {rollout.step_interval_s:g} s; a running server takes it from here")
    return 0


def register(sub) -> None:
    """Add promote, traffic, canary and rollback."""
    p = command(sub, "promote", cmd_promote, "serve one version: all traffic to it at once (stops a running rollout)",
                "leanserve promote cnn:3 --repo model-repo   # for a gradual, guarded switch use: leanserve canary cnn 3")
    add_model_ref(p, "MODEL:VERSION")
    add_repo(p)

    p = command(sub, "traffic", cmd_traffic, "split a model's traffic across versions (A/B, canary) and set a shadow",
                "leanserve traffic cnn --weights 1=90,2=10 --shadow 3")
    p.add_argument("model", help="model name")
    p.add_argument("--weights", help="VERSION=WEIGHT,... (relative weights)")
    p.add_argument("--shadow", help="version that gets a copy of live traffic ('none' to stop)")
    add_repo(p)

    p = command(sub, "canary", cmd_canary,
                "roll a version out as a guarded canary: traffic raised step by step, rolled back automatically if worse",
                "leanserve canary cnn 3 --steps 5,25,50,100 --interval 120")
    p.add_argument("model", help="model name")
    p.add_argument("version", help="the version to roll out")
    config_default(p.add_argument("--steps", help="traffic percentages, increasing"), ROLLOUT, "steps")
    config_default(p.add_argument("--interval", type=float, help="seconds per step at least"), ROLLOUT, "step_interval_s")
    config_default(p.add_argument("--min-requests", type=int, help="canary requests per step before judging"),
                   ROLLOUT, "min_requests")
    config_default(p.add_argument("--max-p99-ratio", type=float, help="largest canary/primary p99 latency ratio"),
                   ROLLOUT, "max_p99_ratio")
    add_repo(p)

    p = command(sub, "rollback", cmd_rollback, "move all of a model's traffic back to the previous version in one step",
                "leanserve rollback cnn --repo model-repo")
    p.add_argument("model", help="model name")
    add_repo(p)
