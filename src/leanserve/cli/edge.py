"""The ``leanserve edge`` command: a device artifact of one version, tested under a device profile."""

from __future__ import annotations

import sys

from leanserve.cli.args import (add_force, add_json, add_model_ref, add_repo, command, config_default, fraction, given,
                                model_ref, open_repo, print_json, subject)
from leanserve.errors import InvalidInput

BUILD = "leanserve.deploy.edge.build:build_edge"


def cmd_edge(args) -> int:
    from leanserve.deploy.edge.build import DoesNotFit, build_edge
    from leanserve.deploy.edge.device import device_profile

    repo = open_repo(args)
    name, version = model_ref(args)
    version = subject(repo, name, version).version
    if args.serve and args.target == "c":
        raise InvalidInput("--serve: C sources (--target c) are compiled into firmware and cannot be served")
    if args.target == "c":
        return _edge_c(args, repo, name, version or None)
    profile = device_profile(args.profile or "phone", threads=args.threads, memory_mb=args.memory_mb)
    try:
        outcome = build_edge(repo, name, version or None, target=args.target, profile=profile, eval_path=args.eval,
                             calib_path=args.calib, report_dir=args.report_dir, progress=args.progress,
                             holdout_path=args.holdout, serve=args.serve, force=args.force,
                             **given(args, max_drop="max_accuracy_drop", time_budget_s="time_budget",
                                     probe_time_s="seconds", holdout_fraction="holdout_fraction", seed="seed"))
    except DoesNotFit as exc:
        _print_report(args, exc.report, None)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if _print_report(args, outcome.report, outcome.ref):
        return 0
    print(f"registered {outcome.ref} ({outcome.report.artifact_bytes:,} bytes, "
          f"{outcome.report.size_ratio:.1%} of the fp32 original); report: {outcome.files[0]}")
    print(f"{outcome.ref} takes all traffic now" if args.serve else
          f"not served; serve it with: leanserve promote {outcome.ref}  (or leanserve canary {name} {outcome.ref.version})")
    return 0


def _edge_c(args, repo, name: str, version: str | None) -> int:
    from leanserve.deploy.edge.c.build import DoesNotFitMcu, build_c_edge, mcu_profile

    profile = mcu_profile(args.profile)
    try:
        outcome = build_c_edge(repo, name, version, profile=profile, eval_path=args.eval, calib_path=args.calib,
                               report_dir=args.report_dir, force=args.force, **given(args, max_drop="max_accuracy_drop"))
    except DoesNotFitMcu as exc:
        _print_report(args, exc.report, None)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if _print_report(args, outcome.report, outcome.ref):
        return 0
    print(f"registered {outcome.ref} (C99 sources, {outcome.report.artifact_bytes:,} bytes compiled; not served); "
          f"report: {outcome.files[0]}")
    return 0


def _print_report(args, report, ref) -> bool:
    """The device report as Markdown, or with --json as one JSON document (then True: nothing else to say)."""
    if args.json:
        print_json({**report.to_dict(), "registered": str(ref) if ref else None})
        return True
    print(report.to_markdown())
    return False


def register(sub) -> None:
    """Add edge."""
    p = command(sub, "edge", cmd_edge,
                "build a device artifact (int8 ORT format, or an ExecuTorch .pte) of a version, test it under a device "
                "profile, register it",
                "leanserve edge cnn:1 --target ort --profile phone --eval eval.npz --max-accuracy-drop 1%\n"
                "leanserve edge cnn:1 --target c --profile cortex-m4 --eval eval.npz   (C99 int8 sources for "
                "microcontrollers, checked on QEMU when gcc-arm-none-eabi and qemu-system-arm are installed)\n"
                "leanserve edge cnn:1 --target executorch --eval eval.npz   (needs a torch.export program: "
                "leanserve export/demo keep one; pip install 'leanserve[edge]')\n"
                "  profiles: phone (1 thread, 512 MB), pi4 (4 threads, 1024 MB), tiny (1 thread, 256 MB); "
                "--target c: cortex-m4 (256 KB flash, 64 KB RAM)\n"
                "  (exit status 1, nothing registered, when the artifact does not run within the profile)")
    add_model_ref(p, "MODEL or MODEL:VERSION (ort: an ONNX version, or a text or image pipeline around one, which "
                  "stays a pipeline around model.ort; executorch: one with a PyTorch program; "
                  "default: the version serving most traffic)")
    p.add_argument("--target", default="ort", metavar="NAME",
                   help="ort (ONNX Runtime's ORT format, for its mobile and minimal builds) or executorch "
                        "(a .pte with the XNNPACK delegate, for PyTorch's on-device runtime) or c (C99 int8 sources "
                        "for microcontrollers)")
    p.add_argument("--profile", help="device profile: phone (the default), pi4 or tiny; --target c: cortex-m4 (the default)")
    p.add_argument("--threads", type=int, help="intra-op threads (instead of the profile's)")
    p.add_argument("--memory-mb", type=int, help="memory cap of the test process in MB (instead of the profile's)")
    p.add_argument("--eval", metavar="NPZ", help="evaluation data (.npz, one array per input, plus labels; a text "
                   "pipeline's: a 'text' array of strings, judged inside its stages): int8 variants "
                   "are searched within the budget; without it, int8 is used unchecked (dynamic; executorch: static "
                   "when --calib is given)")
    p.add_argument("--holdout", metavar="NPZ", help="held-out data the artifact's accuracy is reported on (default: "
                   "hold out --holdout-fraction of --eval's rows; the int8 choice uses the rest)")
    config_default(p.add_argument("--holdout-fraction", type=fraction, metavar="F",
                                  help="share of --eval's rows held out from the choice to report accuracy on, "
                                       "when no --holdout"), BUILD, "holdout_fraction")
    config_default(p.add_argument("--seed", type=int, help="seed of the held-out split"), BUILD, "seed")
    p.add_argument("--serve", action="store_true", help="send all server traffic to the new artifact at once "
                   "(otherwise registered only; serve it later with leanserve promote or canary)")
    p.add_argument("--calib", metavar="NPZ", help="calibration data for static int8 (default: the evaluation inputs)")
    config_default(p.add_argument("--max-accuracy-drop", help="largest quality drop accepted: 1%% = 1 point, "
                                  "1%%rel = 1%% of the original, 0.01 as is"), BUILD, "max_drop")
    p.add_argument("--report-dir", metavar="DIR", help="also write the device report here (kept when nothing is registered)")
    config_default(p.add_argument("--seconds", type=float, help="at least this long timing latency under the profile"),
                   BUILD, "probe_time_s")
    config_default(p.add_argument("--time-budget", type=float, metavar="S", help="seconds the int8 search may take "
                                  "(ort; executorch tries at most two int8 programs)"), BUILD, "time_budget_s")
    p.add_argument("--progress", action="store_true", help="show the int8 search's progress")
    add_force(p, "an artifact whose held-out accuracy drops by more than --max-accuracy-drop")
    add_json(p, "the device report and the version registered")
    add_repo(p)
