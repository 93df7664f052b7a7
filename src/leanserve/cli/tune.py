"""The ``leanserve tune`` command: measure serving settings on a real server, write the fastest within a p99 bound."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from leanserve.cli.args import add_json, add_repo, command, config_default, given, open_repo, print_json

TUNE = "leanserve.serve.tune:TuneOptions"

EXIT_NO_FIT = 1


def cmd_tune(args) -> int:
    from tqdm import tqdm

    from leanserve.measure import cpu_description
    from leanserve.serve.candidates import Candidate, default_grid, parse_concurrency, parse_grid, with_current
    from leanserve.serve.tune import OTHER_CORES_WARN, TuneOptions, apply_candidate, tune

    options = TuneOptions(p99_ms=args.p99_ms, **given(args, seconds="seconds", load="load"),
                          **({"concurrency": parse_concurrency(args.concurrency)} if args.concurrency else {}))
    repo = open_repo(args)
    current = Candidate.of(repo.config(args.model))
    grid = parse_grid(args.grid, current) if args.grid else default_grid()
    runs = len(with_current(grid, current)) * len(options.concurrency)
    cpu = cpu_description()
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    say(f"tuning {args.model} on {cpu['model']} ({cpu['cores']} cores): {runs // len(options.concurrency)} settings x "
          f"concurrency {','.join(map(str, options.concurrency))}, {options.seconds} s each; load from "
          f"{'wrk (1 thread)' if options.load == 'wrk' else 'the in-process asyncio/httpx client (slower than wrk)'}; "
          f"bound p99 <= {options.p99_ms:g} ms")
    with tqdm(total=runs, desc="tuning", unit="run", file=sys.stderr) as bar:
        def progress(m) -> None:
            bar.set_postfix_str(f"{m.candidate.batch} i{m.candidate.instances} c{m.concurrency}: "
                                + (m.failure[:30] if m.failure else f"{m.requests_per_s:.0f}/s p99 {m.p99_ms:.1f}ms"))
            bar.update(1)

        result = tune(repo, args.model, options, grid, on_measurement=progress)
    best = result.best
    plot = Path(args.plot or f"tune-{args.model}.png")
    plot_result(result, plot)
    if args.json:
        written = best is not None and not args.dry_run and apply_candidate(repo, args.model, best.candidate)
        print_json({"model": result.model, "version": result.version, "p99_ms_bound": options.p99_ms,
                    "measurements": [asdict(m) for m in result.measurements],
                    "chosen": asdict(best) if best else None, "config_written": written, "plot": str(plot),
                    "busiest_other_cores": result.busiest_other_cores})
        return 0 if best is not None else EXIT_NO_FIT
    print(format_table(result))
    print(f"plot: {plot}")
    if result.busiest_other_cores > OTHER_CORES_WARN:
        print(f"warning: other processes used up to {result.busiest_other_cores:.1f} cores during the measurements; "
              "the figures (p99 above all) may say more about them than about the settings: rerun on a quiet machine")
    if best is None:
        print(f"no setting keeps p99 <= {options.p99_ms:g} ms at any concurrency tried; the config is unchanged "
              "(try a looser bound, fewer connections or a faster model)")
        return EXIT_NO_FIT
    print(f"chosen: {best.candidate.label}: {best.requests_per_s:.0f} req/s at {best.concurrency} connections, "
          f"p99 {best.p99_ms:.2f} ms")
    if args.dry_run:
        print("dry run: the config is unchanged")
    elif apply_candidate(repo, args.model, best.candidate):
        print(f"written to {repo.root / args.model / 'config.json'}; a running server applies it when the model "
              f"reloads (POST /v2/admin/models/{args.model}/reload)")
    else:
        print("the current setting is already the best; the config is unchanged")
    return 0


def format_table(result) -> str:
    """One row per setting and concurrency; ``*`` marks the chosen row, ``-`` rows over the bound or failing."""
    best, bound = result.best, result.options.p99_ms
    lines = [f"  {'batch':<12}{'inst':>5}{'threads':>8}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'other CPU':>10}"]
    for m in result.measurements:
        c = m.candidate
        mark = "*" if m is best else (" " if m.within(bound) else "-")
        row = f"{mark} {c.batch:<12}{c.instances:>5}{c.intra_op_threads or 'auto':>8}{m.concurrency:>6}"
        if m.failure:
            row += f"  {m.failure[:100]}"
        else:
            row += f"{m.requests_per_s:>10.0f}{m.p50_ms:>9.2f}{m.p99_ms:>9.2f}{m.errors:>8}{m.other_cores:>10.2f}"
        lines.append(row + ("  current" if c == result.current else ""))
    return "\n".join(lines)


def plot_result(result, path: Path) -> None:
    """Throughput against p99 latency, one line per setting through its concurrencies; the bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for candidate in dict.fromkeys(m.candidate for m in result.measurements):
        points = [m for m in result.measurements if m.candidate == candidate and not m.failure and m.requests]
        if points:
            ax.plot([m.p99_ms for m in points], [m.requests_per_s for m in points], marker="o",
                    label=candidate.label + (" (current)" if candidate == result.current else ""))
            for m in points:
                ax.annotate(f"c{m.concurrency}", (m.p99_ms, m.requests_per_s), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.axvline(result.options.p99_ms, color="grey", linestyle="--", label=f"p99 bound {result.options.p99_ms:g} ms")
    if result.best is not None:
        ax.scatter([result.best.p99_ms], [result.best.requests_per_s], s=250, marker="*", color="gold",
                   edgecolors="black", zorder=5, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency (ms, log scale)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title(f"{result.model}:{result.version}: throughput against p99 per setting")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(sub) -> None:
    """Add tune."""
    p = command(sub, "tune", cmd_tune,
                "measure batching, instance and thread settings on a real server and write the fastest within a p99 bound",
                "leanserve tune digits-cnn --p99-ms 10 --concurrency 1,8,32 --seconds 5\n"
                "  leanserve tune digits-cnn --p99-ms 5 --grid 'max_batch_size=off,16;instances=1,2' --dry-run\n"
                "  (exit status 1, config unchanged, when no setting keeps the bound)")
    p.add_argument("model", help="model name")
    p.add_argument("--p99-ms", type=float, required=True, help="latency bound: the 99th percentile in milliseconds")
    config_default(p.add_argument("--concurrency", metavar="LIST", help="connection counts to load the server with"),
                   TUNE, "concurrency")
    config_default(p.add_argument("--seconds", type=int, help="seconds per measurement"), TUNE, "seconds")
    p.add_argument("--grid", metavar="SPEC",
                   help="settings to try instead of the default nine: KEY=V1,V2;... over max_batch_size (or off), "
                        "max_queue_delay_us, instances, intra_op_threads (the product; unset keys keep the current value)")
    config_default(p.add_argument("--load", choices=["auto", "wrk", "python"],
                                  help="load generator: wrk, the in-process asyncio/httpx client, or (auto) wrk when "
                                       "installed"), TUNE, "load")
    p.add_argument("--plot", metavar="PNG", help="where to write the plot (default: tune-MODEL.png)")
    p.add_argument("--dry-run", action="store_true", help="measure and report, but leave the config as it is")
    add_json(p, "every measurement and the choice")
    add_repo(p)
