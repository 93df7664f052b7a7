"""``leanserve optimize``: faster variants of a version within a quality budget, the best registered."""

from __future__ import annotations

from leanserve.cli.args import (add_force, add_json, add_model_ref, add_repo, command, config_default, fraction, given,
                                model_ref, open_repo, print_json, subject)

OPTIMIZE = "leanserve.optimize.run:optimize"


def cmd_optimize(args) -> int:
    import time

    from leanserve.optimize.recipe import parse_engines, parse_recipe
    from leanserve.optimize.report import report_dict
    from leanserve.optimize.run import optimize

    repo = open_repo(args)
    name, version = model_ref(args)
    version = subject(repo, name, version).version
    report_dir = args.report_dir or f"optimize-reports/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = optimize(
        repo, name, version, eval_path=args.eval, holdout_path=args.holdout, calib_path=args.calib,
        metric=args.metric, recipes=[parse_recipe(r) for r in args.recipe] or None, report_dir=report_dir,
        register=not args.dry_run, engines=parse_engines(args.engines), serve=args.serve, progress=not args.json,
        force=args.force,
        **given(args, holdout_fraction="holdout_fraction", seed="seed", max_drop="max_accuracy_drop",
                time_budget_s="time_budget", objective="objective", batch_size="batch_size"),
    )
    result = outcome.result
    if args.json:
        print_json({**report_dict(result), "registered": str(outcome.ref) if outcome.ref else None,
                    "served": bool(outcome.ref and args.serve), "report_files": [str(p) for p in outcome.report_files]})
        return 0
    print_candidates(result)
    if result.chosen is None or result.chosen is result.baseline:
        print("no variant is faster within the budget; the original stays (nothing registered)")
    elif outcome.ref:
        print(f"registered {outcome.ref} ({result.chosen.recipe.name})")
        print(f"{outcome.ref} takes all traffic now" if args.serve else
              f"not served; serve it with: leanserve promote {outcome.ref}  (or leanserve canary {name} {outcome.ref.version})")
    else:
        print(f"chosen (dry run, not registered): {result.chosen.recipe.name}")
    for path in outcome.report_files:
        print(f"report: {path}")
    return 0


def print_candidates(result) -> None:
    """The baseline and each candidate: selection quality (what chose) beside held-out quality (what to trust)."""
    base, metric = result.baseline.measurement, result.metric
    if result.holdout is not None:
        print(f"data: {result.holdout.describe()}; chosen on selection, {metric} reported on held-out")
    print(f"baseline: {metric} selection={base.quality:.4f} held-out={_fmt(result.baseline.holdout_quality)}, "
          f"p50 {base.speed.latency_p50_ms:.3f} ms, {base.size_bytes:,} bytes")
    for c in result.candidates:
        if c.error:
            print(f"  {c.recipe.name:<40} failed: {c.error}")
            continue
        m = c.measurement
        print(f"  {c.recipe.name:<40} {metric} selection={m.quality:.4f} (drop {c.drop:+.4f}) "
              f"held-out={_fmt(c.holdout_quality)} (drop {_fmt(c.holdout_drop, '+.4f')}) p50 {m.speed.latency_p50_ms:.3f} ms "
              f"x{base.speed.latency_p50_ms / m.speed.latency_p50_ms:.2f}  {m.size_bytes:,} bytes  "
              f"{'within budget' if c.within_budget else 'OVER budget'}")
    if result.skipped:
        print(f"not tried, the time budget (--time-budget) was spent: {', '.join(result.skipped)}")


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def register(sub) -> None:
    """Add optimize."""
    p = command(sub, "optimize", cmd_optimize,
                "search for faster variants (graph fusion, int8, int4...) within an accuracy budget and register the best",
                "leanserve optimize cnn --eval eval.npz --calib calib.npz --max-accuracy-drop 0.5%\n"
                "  (eval/calib: .npz with one array per model input, plus 'labels' for top1/mse;\n"
                "   without labels quality is the cosine similarity of outputs to the original model)")
    add_model_ref(p)
    p.add_argument("--eval", required=True, help=".npz evaluation data (inputs, optional 'labels')")
    p.add_argument("--holdout", metavar="NPZ",
                   help="held-out data to report quality on (default: hold out --holdout-fraction of --eval's rows)")
    config_default(p.add_argument("--holdout-fraction", type=fraction, metavar="F",
                                  help="share of --eval's rows held out from the choice to report quality on, "
                                       "when no --holdout"), OPTIMIZE, "holdout_fraction")
    config_default(p.add_argument("--seed", type=int, help="seed of the held-out split"), OPTIMIZE, "seed")
    p.add_argument("--serve", action="store_true", help="send all server traffic to the chosen variant at once "
                   "(otherwise registered only; serve it later with leanserve promote or canary)")
    p.add_argument("--calib", help=".npz calibration data for static int8 (default: the evaluation inputs)")
    config_default(p.add_argument("--max-accuracy-drop", help="budget: 0.5%% = 0.5 points, 1%%rel = relative, "
                                  "0.01 = metric units"), OPTIMIZE, "max_drop")
    p.add_argument("--metric", choices=["top1", "cosine", "mse"], help="quality metric (default: from the data)")
    p.add_argument("--recipe", action="append", default=[], metavar="STEPS",
                   help="try this recipe instead of the defaults, e.g. transformer+dynamic_int8 or static_int8:method=entropy (repeat)")
    config_default(p.add_argument("--time-budget", type=float, metavar="S", help="seconds the search may take"),
                   OPTIMIZE, "time_budget_s")
    config_default(p.add_argument("--objective", choices=["latency", "throughput"], help="what 'fastest' means"),
                   OPTIMIZE, "objective")
    config_default(p.add_argument("--batch-size", type=int, help="batch size of the throughput measurement"),
                   OPTIMIZE, "batch_size")
    p.add_argument("--report-dir", help="where to write report.md/json and pareto.png (default: optimize-reports/MODEL-TIME)")
    p.add_argument("--engines", default="ort", metavar="LIST",
                   help="engines to measure candidates on, e.g. ort,openvino,tvm; the winner is served with its engine")
    p.add_argument("--dry-run", action="store_true", help="measure and report, register nothing")
    add_force(p, "a chosen variant whose held-out quality drops by more than --max-accuracy-drop")
    add_json(p, "the search's report (what report.json holds), the version registered and the report files")
    add_repo(p)
