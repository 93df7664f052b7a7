"""``leanserve learn MODEL --online``: the learner as its own process, beside the server."""

from __future__ import annotations

import sys
from pathlib import Path

from leanserve.cli.args import add_repo, command, config_default, given, open_repo, positive_int

LEARNER = "leanserve.learn.learner:LearnerConfig"


def cmd_learn(args) -> int:
    import torch

    from leanserve.errors import InvalidInput
    from leanserve.learn.learner import Learner, LearnerConfig
    from leanserve.learn.online import OnlineConfig

    if not args.online:
        raise InvalidInput("say how to learn: --online (labelled feedback from the prediction log); "
                           "federated rounds are `leanserve federate`")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # a core or two for learning leaves the rest to the server
    repo = open_repo(args)
    config = LearnerConfig(OnlineConfig(**given(args, algorithm="algorithm", lr="lr")),
                           **given(args, window="window", margin="margin", poll_interval_s="poll_interval_s"))
    learner = Learner(repo, args.model, Path(args.db) if args.db else repo.root / ".monitor" / "predictions.db", config)
    try:
        reports = learner.run(once=args.once, report=_print_report)
    finally:
        learner.close()
        torch.set_num_threads(threads)
    return 1 if args.once and reports[-1].refused else 0


def _print_report(report) -> None:
    line = f"{report.serving}: {report.new_samples} new labelled samples, {report.samples_seen} learnt"
    if report.accuracy is not None:
        line += f"; window accuracy {report.accuracy:.1%} (serving {report.serving_accuracy:.1%})"
    if report.registered:
        line += f"; registered {report.registered}, started as a guarded canary"
    if report.note:
        line += f"; {report.note}"
    print(line, file=sys.stderr if report.refused else sys.stdout, flush=True)


def register(sub) -> None:
    """Add learn."""
    p = command(sub, "learn", cmd_learn,
                "learn online from labelled feedback and register better versions as guarded canaries",
                "leanserve learn digits-mlp --online --algorithm hbp --repo model-repo   # beside `leanserve serve`\n"
                "  leanserve learn digits-mlp --online --once      # process what is labelled now and exit (cron)")
    p.add_argument("model", help="model name (learns from its serving version, which needs a PyTorch source)")
    p.add_argument("--online", action="store_true", help="learn from the labelled rows of the prediction log")
    config_default(p.add_argument("--algorithm", choices=["ogd", "hbp"], help="ogd: gradient steps with a replay "
                                  "buffer; hbp: Hedge Backpropagation (MLP classifiers)"),
                   "leanserve.learn.online:OnlineConfig", "algorithm")
    p.add_argument("--db", metavar="PATH", help="prediction log (default: REPO/.monitor/predictions.db)")
    p.add_argument("--once", action="store_true", help="process what is labelled now and exit")
    config_default(p.add_argument("--window", type=positive_int, help="samples over which learner and serving version "
                                  "are compared"), LEARNER, "window")
    config_default(p.add_argument("--margin", type=float, help="accuracy by which the learner must beat the serving "
                                  "version"), LEARNER, "margin")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.04 for ogd, 0.1 for hbp)")
    config_default(p.add_argument("--poll-interval-s", type=float, help="seconds between reads of the prediction log"),
                   LEARNER, "poll_interval_s")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for learning")
    add_repo(p)
