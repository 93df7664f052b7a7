"""``leanserve bench``: compare engines on one version, on this machine, registering nothing."""

from __future__ import annotations

from leanserve.cli.args import (add_json, add_model_ref, add_repo, command, config_default, given, model_ref,
                                open_repo, print_json, subject)

COMPARE = "leanserve.runtime.compare:compare_engines"


def cmd_bench(args) -> int:
    from dataclasses import asdict

    from leanserve.measure import cpu_description
    from leanserve.optimize.recipe import parse_engines
    from leanserve.optimize.run import load_data
    from leanserve.runtime.compare import compare_engines, format_table

    engines = parse_engines(args.engines)
    repo = open_repo(args)
    name, version = model_ref(args)
    artifact = repo.get(name, subject(repo, name, version).version)
    data = load_data(args.data, artifact.signature, "benchmark") if args.data else None
    cpu = cpu_description()
    if not args.json:
        print(f"{name}:{artifact.path.name} on {cpu['model']} ({cpu['cores']} cores; "
              f"{', '.join(cpu['flags']) or 'no AVX2/VNNI'}); {'given data' if data else 'synthetic inputs'}; "
              "nothing is registered")
    results = compare_engines(artifact, engines, data, **given(args, batch_size="batch_size",
                                                               time_budget_s="compile_budget", speed_time_s="seconds"))
    failed = any(r.error or r.mismatch for r in results)
    if args.json:
        print_json({"model": name, "version": int(artifact.path.name), "cpu": cpu, "data": "given" if data else "synthetic",
                    "results": [asdict(r) for r in results], "ok": not failed})
    else:
        print(format_table(results, args.batch_size or _default_batch()))
    return 1 if failed else 0


def _default_batch() -> int:
    import inspect

    from leanserve.runtime.compare import compare_engines

    return inspect.signature(compare_engines).parameters["batch_size"].default


def register(sub) -> None:
    """Add bench."""
    p = command(sub, "bench", cmd_bench,
                "compare engines (ONNX Runtime, OpenVINO, TVM) on one version on this machine, without registering",
                "leanserve bench cnn:1 --engines ort,openvino,tvm --batch-size 32\n"
                "  (exit status 1 when an engine fails or its outputs differ from ONNX Runtime's)")
    add_model_ref(p, "MODEL or MODEL:VERSION (an ONNX version; default: the version serving most traffic)")
    p.add_argument("--engines", default="ort,openvino", metavar="LIST", help="engines to compare")
    p.add_argument("--data", metavar="NPZ", help="inputs to time and compare on (default: synthetic inputs)")
    config_default(p.add_argument("--batch-size", type=int, help="batch size of the throughput figure"),
                   COMPARE, "batch_size")
    config_default(p.add_argument("--seconds", type=float, help="at least this long per latency and throughput figure"),
                   COMPARE, "speed_time_s")
    config_default(p.add_argument("--compile-budget", type=float, metavar="S",
                                  help="seconds an ahead-of-time engine may spend compiling (TVM tunes with it; "
                                       "0: untuned)"), COMPARE, "time_budget_s")
    add_json(p, "each engine's figures")
    add_repo(p)
