"""The ``leanserve`` command: a thin layer that parses arguments, calls the Python API and prints.

Every error a user can cause ends as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import Provenance, TensorSpec
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.model import default_repo
from leanserve.runtime import ENGINES

EXIT_ERROR = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except LeanserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _repo(args):
    from leanserve.repository import Repository

    return Repository(args.repo, create=getattr(args, "create_repo", False))


# --- commands ---------------------------------------------------------------------------------------

def cmd_import(args) -> int:
    from leanserve.hf_import import is_hf_folder
    from leanserve.repository import Repository

    repo = Repository(args.repo)
    if is_hf_folder(Path(args.model)):
        return _import_hf(args, repo)
    ref = repo.add(
        args.model, args.name,
        inputs=[TensorSpec.parse(s) for s in args.input] or None,
        outputs=[TensorSpec.parse(s) for s in args.output] or None,
        runtime=args.engine,
        check_load=not args.no_check,
        serve=True if args.serve else (False if args.register else None),
    )
    artifact = repo.get(ref.name, ref.version, verify=False)
    state = repo.state(ref.name).get(ref.version, "registered")
    print(f"imported {args.model} as {ref} ({artifact.manifest.format}, {artifact.size_bytes:,} bytes); "
          + ("it takes all traffic" if state == "serving" else
             f"registered, not served (serve it with: leanserve promote {ref})"))
    _print_signature(artifact.signature)
    if args.data:
        from leanserve.monitor.reference import build_reference, profile_path
        from leanserve.optimize.run import load_data

        try:
            data = load_data(args.data, artifact.signature, "reference")
            build_reference(repo, ref.name, ref.version, data)
        except LeanserveError as exc:  # the version stays: a profile can be added later
            print(f"imported, but no reference profile: {exc}\n  add one with: leanserve profile {ref} --data FILE",
                  file=sys.stderr)
            return 1
        print(f"reference profile for drift checks from {len(next(iter(data.values())))} rows: "
              f"{profile_path(repo, ref.name, ref.version)}")
    return 0


def _import_hf(args, repo) -> int:
    from leanserve.hf_import import import_folder

    result = import_folder(args.model, repo, args.name, truncate=args.truncate, check=not args.no_check)
    artifact = repo.get(result.pipeline_ref.name, result.pipeline_ref.version, verify=False)
    print(f"imported {args.model} ({result.task}) as {result.pipeline_ref} with its pipeline "
          f"({artifact.size_bytes:,} bytes), and the model alone as {result.tensors_ref}")
    if result.check:
        print("checked against the library: " + ", ".join(f"{k} {v:.6g}" for k, v in result.check.items()))
    _print_signature(artifact.signature)
    return 0


def cmd_export(args) -> int:
    from leanserve.from_torch import export

    module, example = _load_factory(args.factory)
    out = Path(args.out) if args.out else Path(f"{args.name or 'model'}.onnx")
    axes = {}
    for item in args.dynamic_axis:
        name, _, axis = item.partition(":")
        if not axis.isdigit():
            raise InvalidInput(f"--dynamic-axis {item!r}: expected INPUT:AXIS, e.g. input_ids:1")
        axes.setdefault(name, []).append(int(axis))
    result = export(
        module, example, out,
        input_names=args.input_names.split(",") if args.input_names else None,
        output_names=args.output_names.split(",") if args.output_names else None,
        dynamic_axes=axes or None, opset=args.opset, tolerance=args.tolerance, force=args.force,
        exporter=args.exporter,
    )
    print(f"exported {args.factory} to {out} with the {result.exporter} exporter "
          f"(max abs diff vs PyTorch {result.max_abs_diff:.3g})")
    if args.name:
        from leanserve.repository import Repository

        import tempfile

        from leanserve.torch_source import save_program, save_source

        # the module itself: TorchScript for learning and explanations, torch.export for device compilers
        with tempfile.TemporaryDirectory() as tmp:
            sources = [save_source(module, example, tmp), save_program(module, example, tmp)]
            ref = Repository(args.repo).add(out, args.name, provenance=Provenance(source=args.factory, exporter=result.exporter),
                                            metrics={"export_max_abs_diff": result.max_abs_diff},
                                            attachments=[s for s in sources if s])
        print(f"imported as {ref}")
    return 0


def _load_factory(spec: str):
    import importlib.util

    path, _, func = spec.rpartition(":")
    if not path or not func or not path.endswith(".py"):
        raise InvalidInput(f"{spec!r}: expected FILE.py:FUNCTION, a function returning (module, example_inputs)")
    if not Path(path).is_file():
        raise InvalidInput(f"{path}: no such file")
    module_spec = importlib.util.spec_from_file_location("leanserve_user_factory", path)
    user = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(user)  # the user's own code, run on the user's request
    if not hasattr(user, func):
        raise InvalidInput(f"{path} has no function {func!r}")
    result = getattr(user, func)()
    if not isinstance(result, tuple) or len(result) != 2:
        raise InvalidInput(f"{spec} must return (module, example_inputs)")
    return result


def cmd_list(args) -> int:
    repo = _repo(args)
    models = repo.models()
    if not models:
        print(f"no models in {repo.root}")
        return 0
    print(f"{'MODEL':<24} {'VERSIONS':<16}")
    for name in models:
        versions = repo.versions(name)
        print(f"{name:<24} {','.join(map(str, versions)) or '-':<16}")
        states = repo.state(name) if versions else {}
        for version in versions:
            try:
                artifact = repo.get(name, version, verify=False)
                fmt, size = artifact.manifest.format, f"{artifact.size_bytes:,} bytes"
                parent = artifact.manifest.provenance.parent
            except LeanserveError as exc:
                fmt, size, parent = "unreadable", str(exc), None
            print(f"  v{version:<6} {states.get(version, '?'):<11} {fmt:<13} {size}"
                  + (f"  (from {parent})" if parent else ""))
    return 0


def cmd_promote(args) -> int:
    repo = _repo(args)
    name, version = _split_ref(args.model, args.version)
    if not version:
        raise InvalidInput("say which version to serve: leanserve promote MODEL:VERSION")
    before = repo.serving(name)
    ref = repo.promote(name, version)
    print(f"{ref} now takes all traffic (before: {before or 'nothing'}); a running server applies it within its "
          f"poll interval; undo with: leanserve rollback {name}")
    return 0


def cmd_inspect(args) -> int:
    repo = _repo(args)
    name, version = _split_ref(args.model, args.version)
    artifact = repo.get(name, version)
    manifest = json.loads(artifact.manifest.to_json())
    info = {"model": name, "version": int(artifact.path.name), "path": str(artifact.path), "checksums": "verified",
            **manifest, "config": repo.config(name).to_dict()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{name}:{info['version']}  {artifact.manifest.format} via {artifact.manifest.default_runtime}  ({artifact.path})")
    _print_signature(artifact.signature)
    print("provenance: " + ", ".join(f"{k}={v}" for k, v in manifest["provenance"].items() if v is not None))
    print("metrics:    " + ", ".join(f"{k}={v}" for k, v in manifest["metrics"].items()))
    print("files:      " + ", ".join(f"{k} (sha256 {v[:12]}…)" for k, v in manifest["files"].items()) + "  [verified]")
    report = artifact.path / "report.md"
    if report.is_file():
        print(f"\noptimization report ({report}, plot: {artifact.path / 'pareto.png'}):\n")
        print(report.read_text())
    return 0


def cmd_rm(args) -> int:
    repo = _repo(args)
    name, version = _split_ref(args.model, args.version)
    if version is None:
        raise InvalidInput("say which version to remove: leanserve rm MODEL:VERSION (or MODEL --version N)")
    ref = repo.remove(name, version)
    print(f"removed {ref}")
    return 0


def cmd_config(args) -> int:
    from leanserve.config import ModelConfig

    repo = _repo(args)
    config = repo.config(args.model)
    if args.set:
        data = config.to_dict()
        for item in args.set:
            key, sep, raw = item.partition("=")
            if not sep:
                raise InvalidInput(f"--set {item!r}: expected KEY=VALUE, e.g. batching.max_batch_size=16")
            _assign(data, key.split("."), _parse_value(raw), item)
        config = ModelConfig.from_dict(data, where=f"--set for {args.model}")
        repo.set_config(args.model, config)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def _assign(data: dict, path: list[str], value: Any, item: str) -> None:
    for part in path[:-1]:
        if not isinstance(data.get(part), dict):
            raise InvalidInput(f"--set {item!r}: {part!r} is not a settings group")
        data = data[part]
    data[path[-1]] = value


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def cmd_predict(args) -> int:
    from leanserve.deploy.batch import is_dataset
    from leanserve.model import load

    from leanserve.cli.subject import subject
    from leanserve.repository import Repository

    name, version = _split_ref(args.model, args.version)
    if args.executor != "ray" or not (args.batch or is_dataset(Path(args.input))):
        version = subject(Repository(args.repo, create=False), name, version).version
    if args.batch or is_dataset(Path(args.input)):
        return _predict_dataset(args, name, version)
    model = load(name, version, repo=args.repo)
    inputs = read_inputs(Path(args.input), model.signature)
    outputs = model.predict(inputs, args.outputs.split(",") if args.outputs else None)
    if args.output:
        write_outputs(Path(args.output), outputs)
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        print(json.dumps({k: {"datatype": str(v.dtype), "shape": list(v.shape), "data": _jsonable(v)} for k, v in outputs.items()}))
    return 0


def _predict_dataset(args, name: str, version) -> int:
    from leanserve.deploy.batch import run_job
    from leanserve.repository import Repository
    from leanserve.runtime import load_session

    if not args.output:
        raise InvalidInput("a batch job needs --output FOLDER (Parquet parts, rejects.jsonl and the job manifest)")
    if args.executor == "ray":
        return _predict_dataset_ray(args, name, version)
    repo = Repository(args.repo, create=False)
    artifact = repo.get(name, version)
    config = repo.config(name)
    session = load_session(artifact, config.runtime)
    ref_version = int(artifact.path.name)
    try:
        summary = run_job(session, name, ref_version, args.input, args.output, chunk_rows=args.chunk_rows,
                          batch_size=args.batch_size, id_column=args.id_column, allow_nonfinite=args.allow_nan)
    finally:
        session.close()
    resumed = f", {summary.chunks_skipped} chunk(s) already done by an earlier run" if summary.chunks_skipped else ""
    print(f"{name}:{ref_version}: {summary.written:,} rows written, {summary.rejected:,} rejected "
          f"(see {Path(args.output) / 'rejects.jsonl'}){resumed}; {summary.rows_per_s:,.0f} rows/s over "
          f"{summary.chunks_done} new chunk(s) -> {args.output}")
    return 0


def _predict_dataset_ray(args, name: str, version) -> int:
    from leanserve.deploy.ray_batch import run_job_ray

    summary = run_job_ray(args.repo, name, version, args.input, args.output, chunk_rows=args.chunk_rows,
                          batch_size=args.batch_size, id_column=args.id_column, allow_nonfinite=args.allow_nan,
                          address=args.address, actors=args.actors)
    resumed = f", {summary.chunks_skipped} chunk(s) already done by an earlier run" if summary.chunks_skipped else ""
    print(f"{name}: {summary.written:,} rows written, {summary.rejected:,} rejected "
          f"(see {Path(args.output) / 'rejects.jsonl'}){resumed} -> {args.output}")
    print(f"ray: start-up {summary.ray_start_s:.1f} s, first chunk after {summary.first_chunk_s:.1f} s "
          f"({summary.actors} actor(s)), steady {summary.steady_rows_per_s:,.0f} rows/s, "
          f"{summary.rows_per_s:,.0f} rows/s over the whole job")
    return 0


def read_inputs(path: Path, signature) -> dict[str, np.ndarray]:
    """Read a request from .npy (one input), .npz (named) or .json (V2 request or {name: values})."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such input file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if len(signature.inputs) != 1:
                raise InvalidInput(f"{path.name}: a .npy file holds one array; the model takes {signature.input_names}: use .npz")
            return {signature.inputs[0].name: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix == ".json":
            return _read_json_inputs(path, signature)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{path}: unreadable input file ({exc})") from exc
    raise InvalidInput(f"{path.name}: input files must be .npy, .npz or .json")


def _read_json_inputs(path: Path, signature) -> dict[str, np.ndarray]:
    from leanserve.serve.protocol.codec import array_from_json, decode_rest

    body = path.read_bytes()
    doc = json.loads(body)
    if isinstance(doc, dict) and "inputs" in doc:
        return decode_rest(body, None, max_elements=1 << 28).inputs
    if not isinstance(doc, dict):
        raise InvalidInput(f"{path.name}: expected a V2 request or an object of input name -> values")
    arrays = {}
    for name, values in doc.items():
        spec = signature.input(name)
        shape = np.shape(values)
        arrays[name] = array_from_json(name, spec.datatype, shape, values)
    return arrays


def write_outputs(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """Write outputs to .npz, .npy (single output) or .json."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, **outputs)
    elif suffix == ".npy" and len(outputs) == 1:
        np.save(path, next(iter(outputs.values())))
    elif suffix == ".json":
        path.write_text(json.dumps({k: _jsonable(v) for k, v in outputs.items()}))
    else:
        raise InvalidInput(f"{path.name}: output files must be .npz, .json or (one output) .npy")


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.ravel()]
    return array.tolist()


def cmd_demo(args) -> int:
    from leanserve.demo import run_demo
    from leanserve.repository import Repository

    result = run_demo(Repository(args.repo), name=args.name, epochs=args.epochs)
    print(f"exported with the {result.exporter} exporter (max abs diff vs PyTorch {result.max_abs_diff:.2g})")
    print(f"imported as {result.ref} into {args.repo}")
    print(f"held-out accuracy: {result.accuracy:.2%} on scikit-learn digits")
    if result.example_files:
        print("wrote example data for the README's first session: " + ", ".join(p.name for p in result.example_files))
    if args.serve:
        return _serve_demo(args, result)
    return 0


def _serve_demo(args, result) -> int:
    from leanserve.server import run_server
    from leanserve.serve.settings import ServerConfig

    print(f"\nserving; from another terminal, classify a held-out digit (a {result.request_label}):\n")
    print(f"  curl -s http://{args.host}:{args.port}/v2/models/{result.ref.name}/infer -d @{result.request_file}\n")
    run_server(ServerConfig(repo=Path(args.repo), host=args.host, port=args.port, grpc_port=args.grpc_port))
    return 0


def _split_ref(model: str, version: str | None) -> tuple[str, str | None]:
    if ":" in model:
        name, _, ref_version = model.partition(":")
        return name, ref_version
    return model, version


def _print_signature(signature) -> None:
    for kind, specs in (("inputs ", signature.inputs), ("outputs", signature.outputs)):
        print(f"{kind}:    " + "; ".join(s.describe() for s in specs))


# --- parser -----------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_repo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default=str(default_repo()), metavar="DIR",
                        help="model repository folder (env LEANSERVE_REPO)")


def _command(sub, name: str, func, help_text: str, example: str):
    parser = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                            formatter_class=_Formatter)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every leanserve command."""
    parser = argparse.ArgumentParser(
        prog="leanserve",
        description="Turn a trained model into a fast, monitored inference service.",
        epilog=(
            "a first session:\n"
            "  leanserve demo                       # train a digits CNN, import it into ./model-repo\n"
            "  leanserve list                       # what the repository holds\n"
            "  leanserve inspect digits-cnn         # signature, provenance, checksums\n"
            "  leanserve serve model-repo           # Open Inference Protocol over HTTP :8000 and gRPC :8001\n"
            "run 'leanserve COMMAND --help' for each command's options."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = _command(sub, "import", cmd_import, "import a model file (ONNX, TorchScript, torch.export .pt2, OpenVINO .xml) "
                 "or a Hugging Face / sentence-transformers folder (with its tokenizer or image transform) as a new version",
                 "leanserve import model.onnx --name cnn --repo model-repo\n"
                 "  leanserve import path/to/all-MiniLM-L6-v2 --name minilm   # text in, embeddings out; also minilm-tensors")
    p.add_argument("model", help="model file, or a Hugging Face model folder")
    p.add_argument("--truncate", action="store_true", help="Hugging Face text models: cut texts at the model's limit "
                   "(as sentence-transformers does) instead of refusing them with a 400")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--input", action="append", default=[], metavar="NAME:DATATYPE:SHAPE",
                   help="input spec, e.g. x:FP32:-1,1,28,28 (needed for TorchScript; -1 = dynamic; repeat per input)")
    p.add_argument("--output", action="append", default=[], metavar="NAME:DATATYPE:SHAPE", help="output spec (repeat)")
    p.add_argument("--engine", choices=sorted(ENGINES), help="engine to serve it with (default: by format)")
    p.add_argument("--no-check", action="store_true", help="skip the test load and run before importing")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--serve", action="store_true", help="send all traffic to the new version at once (the default "
                     "when the model's lifecycle.on_import is serve)")
    how.add_argument("--register", action="store_true", help="only register the new version; serve it later with "
                     "leanserve promote or canary (the default; a model's first version always serves)")
    p.add_argument("--data", metavar="NPZ", help="typical inputs (.npz, one array per input): stored as the version's "
                   "reference profile, against which the server checks live traffic for drift")
    _add_repo(p)

    p = _command(sub, "export", cmd_export, "export a PyTorch module to ONNX, check it against PyTorch, optionally import it",
                 "leanserve export mymodel.py:build --name cnn   # build() returns (module, example_inputs)")
    p.add_argument("factory", help="FILE.py:FUNCTION returning (nn.Module, example input tensor or tuple)")
    p.add_argument("--name", help="also import the ONNX file as a new version of this model")
    p.add_argument("--out", help="ONNX file to write (default NAME.onnx)")
    p.add_argument("--input-names", help="comma-separated input names (default: forward()'s argument names)")
    p.add_argument("--output-names", help="comma-separated output names")
    p.add_argument("--dynamic-axis", action="append", default=[], metavar="INPUT:AXIS",
                   help="make an axis dynamic besides axis 0 (the batch axis, always dynamic), e.g. input_ids:1 (repeat)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest abs difference from PyTorch accepted")
    p.add_argument("--force", action="store_true", help="keep an export that exceeds the tolerance")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="ONNX exporter (auto: torch.export-based, falling back to TorchScript-based; "
                        "torchscript gives transformer graphs ONNX Runtime can fuse)")
    _add_repo(p)

    p = _command(sub, "list", cmd_list, "list models and their versions, each with its state (serving, canary, "
                 "shadow, registered, retired)", "leanserve list --repo model-repo")
    _add_repo(p)

    p = _command(sub, "promote", cmd_promote, "serve one version: all traffic to it at once (stops a running rollout)",
                 "leanserve promote cnn:3 --repo model-repo   # for a gradual, guarded switch use: leanserve canary cnn 3")
    p.add_argument("model", help="MODEL:VERSION")
    p.add_argument("--version", help="version (instead of MODEL:VERSION)")
    _add_repo(p)

    p = _command(sub, "inspect", cmd_inspect, "show a version's signature, provenance, metrics and verified checksums",
                 "leanserve inspect cnn:2 --repo model-repo")
    p.add_argument("model", help="MODEL or MODEL:VERSION (default: the version serving most traffic)")
    p.add_argument("--version", help="version (instead of MODEL:VERSION)")
    p.add_argument("--json", action="store_true", help="print the full record as JSON")
    _add_repo(p)

    p = _command(sub, "rm", cmd_rm, "remove one version (atomically)", "leanserve rm cnn:1 --repo model-repo")
    p.add_argument("model", help="MODEL:VERSION")
    p.add_argument("--version", help="version (instead of MODEL:VERSION)")
    _add_repo(p)

    p = _command(sub, "config", cmd_config, "show or change a model's settings (version policy, runtime, batching, cache, traffic)",
                 "leanserve config cnn --set version_policy.kind=all --set batching.max_batch_size=16")
    p.add_argument("model", help="model name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one setting (JSON value; repeat)")
    _add_repo(p)

    p = _command(sub, "predict", cmd_predict,
                 "run one request (.npy/.npz/.json), or a batch job over a dataset (Parquet, CSV, JSON lines, "
                 "a folder of images; .npy/.npz with --batch)",
                 "leanserve predict cnn --input request.npz --output result.npz\n"
                 "  leanserve predict cnn --input rows.parquet --output predictions/   # batch job, resumable\n"
                 "  (a batch job writes part-NNNNN.parquet files keyed by row id, rejects.jsonl and _job.json;\n"
                 "   run the same command again after an interruption and it continues where it stopped)")
    p.add_argument("model", help="MODEL or MODEL:VERSION")
    p.add_argument("--input", required=True, help="one request: .npy (single input), .npz (named inputs) or .json "
                   "(V2 request or {name: values}); a dataset: .parquet, .csv, .jsonl or a folder of images")
    p.add_argument("--output", help="one request: write outputs to .npz/.json/.npy instead of printing; "
                   "a batch job: the output folder")
    p.add_argument("--outputs", help="comma-separated output names (default: all)")
    p.add_argument("--version", help="version (default: the version serving most traffic)")
    p.add_argument("--batch", action="store_true", help="treat a .npy/.npz input as a dataset of rows (a batch job)")
    p.add_argument("--chunk-rows", type=int, default=65536, help="batch job: rows read, run and written per chunk")
    p.add_argument("--batch-size", type=int, default=1024, help="batch job: rows per engine call")
    p.add_argument("--id-column", help="batch job: the column holding row ids (default: 'id' if present, else row numbers)")
    p.add_argument("--allow-nan", action="store_true", help="batch job: pass rows with NaN/Inf to the model instead of rejecting them")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="batch job: where it runs: here (local, the default) or on Ray Data (pip install 'leanserve[ray]')")
    p.add_argument("--address", help="--executor ray: an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto; "
                   "default: start a local Ray on this machine's CPUs)")
    p.add_argument("--actors", type=int, help="--executor ray: actors in the pool, one engine session each "
                   "(default: one per CPU of the cluster)")
    _add_repo(p)

    p = _command(sub, "demo", cmd_demo, "train a small CNN on scikit-learn digits, export it to ONNX and import it",
                 "leanserve demo --repo model-repo --serve")
    p.add_argument("--name", default="digits-cnn", help="model name")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--serve", action="store_true", help="serve the repository afterwards")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    _add_repo(p)

    from leanserve.cli.serving import add_serve_commands

    add_serve_commands(sub, _command, _add_repo)
    from leanserve.cli.optimize import add_optimize_command

    add_optimize_command(sub, _command, _add_repo)
    from leanserve.cli.bench import add_bench_command

    add_bench_command(sub, _command, _add_repo)
    from leanserve.cli.tune import add_tune_command

    add_tune_command(sub, _command, _add_repo)
    from leanserve.cli.edge import add_edge_command

    add_edge_command(sub, _command, _add_repo)
    from leanserve.cli.k8s import add_k8s_command

    add_k8s_command(sub, _command, _add_repo)
    from leanserve.cli.fairness import add_mitigate_command

    add_mitigate_command(sub, _command, _add_repo)
    from leanserve.cli.federate import add_federate_commands

    add_federate_commands(sub, _command, _add_repo)
    from leanserve.cli.learn import add_learn_command

    add_learn_command(sub, _command, _add_repo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
