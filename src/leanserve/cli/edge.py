"""The ``leanserve edge`` command: a device artifact of one version, tested under a device profile."""

from __future__ import annotations

import sys

from leanserve.errors import InvalidInput


def cmd_edge(args) -> int:
    from leanserve.deploy.edge.build import DoesNotFit, build_edge
    from leanserve.cli.subject import subject
    from leanserve.deploy.edge.device import device_profile
    from leanserve.repository import Repository

    name, _, version = args.model.partition(":")
    repo = Repository(args.repo, create=False)
    version = subject(repo, name, version).version
    if args.serve and args.target == "c":
        raise InvalidInput("--serve: C sources (--target c) are compiled into firmware and cannot be served")
    if args.target == "c":
        return _edge_c(args, repo, name, version or None)
    profile = device_profile(args.profile or "phone", threads=args.threads, memory_mb=args.memory_mb)
    try:
        outcome = build_edge(repo, name, version or None, target=args.target, profile=profile, eval_path=args.eval,
                             calib_path=args.calib, max_drop=args.max_accuracy_drop, report_dir=args.report_dir,
                             time_budget_s=args.time_budget, probe_time_s=args.seconds, progress=args.progress,
                             holdout_path=args.holdout, holdout_fraction=args.holdout_fraction, seed=args.seed,
                             serve=args.serve)
    except DoesNotFit as exc:
        print(exc.report.to_markdown())
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(outcome.report.to_markdown())
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
                               max_drop=args.max_accuracy_drop, report_dir=args.report_dir)
    except DoesNotFitMcu as exc:
        print(exc.report.to_markdown())
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(outcome.report.to_markdown())
    print(f"registered {outcome.ref} (C99 sources, {outcome.report.artifact_bytes:,} bytes compiled; not served); "
          f"report: {outcome.files[0]}")
    return 0


def add_edge_command(sub, command, add_repo) -> None:
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
    p.add_argument("model", help="MODEL or MODEL:VERSION (ort: an ONNX version; executorch: one with a PyTorch program)")
    p.add_argument("--target", default="ort", metavar="NAME",
                   help="ort (ONNX Runtime's ORT format, for its mobile and minimal builds) or executorch "
                        "(a .pte with the XNNPACK delegate, for PyTorch's on-device runtime) or c (C99 int8 sources "
                        "for microcontrollers)")
    p.add_argument("--profile", help="device profile: phone (the default), pi4 or tiny; --target c: cortex-m4 (the default)")
    p.add_argument("--threads", type=int, help="intra-op threads (instead of the profile's)")
    p.add_argument("--memory-mb", type=int, help="memory cap of the test process in MB (instead of the profile's)")
    p.add_argument("--eval", metavar="NPZ", help="evaluation data (.npz, one array per input, plus labels): int8 variants "
                   "are searched within the budget; without it, int8 is used unchecked (dynamic; executorch: static "
                   "when --calib is given)")
    p.add_argument("--holdout", metavar="NPZ", help="held-out data the artifact's accuracy is reported on (default: "
                   "hold out --holdout-fraction of --eval's rows; the int8 choice uses the rest)")
    p.add_argument("--holdout-fraction", type=float, default=0.3, metavar="F",
                   help="share of --eval's rows held out from the choice to report accuracy on, when no --holdout")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--serve", action="store_true", help="send all server traffic to the new artifact at once "
                   "(default: registered only; serve it later with leanserve promote or canary)")
    p.add_argument("--calib", metavar="NPZ", help="calibration data for static int8 (default: the evaluation inputs)")
    p.add_argument("--max-accuracy-drop", default="1%",
                   help="largest quality drop accepted: 1%% = 1 point, 1%%rel = 1%% of the original, 0.01 as is")
    p.add_argument("--report-dir", metavar="DIR", help="also write the device report here (kept when nothing is registered)")
    p.add_argument("--seconds", type=float, default=1.0, help="at least this long timing latency under the profile")
    p.add_argument("--time-budget", type=float, default=300.0, metavar="S",
                   help="seconds the int8 search may take (ort; executorch tries at most two int8 programs)")
    p.add_argument("--progress", action="store_true", help="show the int8 search's progress")
    add_repo(p)
