"""The ``leanserve bench`` command: compare engines on one version, on this machine."""

from __future__ import annotations


def cmd_bench(args) -> int:
    from leanserve.measure import cpu_description
    from leanserve.optimize.recipe import parse_engines
    from leanserve.optimize.run import load_data
    from leanserve.repository import Repository
    from leanserve.runtime.compare import compare_engines, format_table

    engines = parse_engines(args.engines)
    from leanserve.cli.subject import subject

    name, _, version = args.model.partition(":")
    repo = Repository(args.repo, create=False)
    artifact = repo.get(name, subject(repo, name, version).version)
    data = load_data(args.data, artifact.signature, "benchmark") if args.data else None
    cpu = cpu_description()
    print(f"{name}:{artifact.path.name} on {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags']) or 'no AVX2/VNNI'}); "
          f"{'given data' if data else 'synthetic inputs'}; nothing is registered")
    results = compare_engines(artifact, engines, data, batch_size=args.batch_size, time_budget_s=args.compile_budget,
                              speed_time_s=args.seconds)
    print(format_table(results, args.batch_size))
    return 1 if any(r.error or r.mismatch for r in results) else 0


def add_bench_command(sub, command, add_repo) -> None:
    p = command(sub, "bench", cmd_bench,
                "compare engines (ONNX Runtime, OpenVINO, TVM) on one version on this machine, without registering",
                "leanserve bench cnn:1 --engines ort,openvino,tvm --batch-size 32\n"
                "  (exit status 1 when an engine fails or its outputs differ from ONNX Runtime's)")
    p.add_argument("model", help="MODEL or MODEL:VERSION (an ONNX version)")
    p.add_argument("--engines", default="ort,openvino", metavar="LIST", help="engines to compare (default ort,openvino)")
    p.add_argument("--data", metavar="NPZ", help="inputs to time and compare on (default: synthetic inputs)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput figure")
    p.add_argument("--seconds", type=float, default=1.0, help="at least this long per latency and throughput figure")
    p.add_argument("--compile-budget", type=float, default=0.0, metavar="S",
                   help="seconds an ahead-of-time engine may spend compiling (TVM tunes with it; default 0: untuned)")
    add_repo(p)
