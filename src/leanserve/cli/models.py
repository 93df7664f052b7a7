"""Commands on the repository's models: ``import``, ``export``, ``list``, ``inspect``, ``rm`` and ``config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leanserve.artifact import TensorSpec
from leanserve.cli.args import (add_json, add_model_ref, add_repo, command, config_default, given, model_ref,
                                open_repo, print_json)
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.runtime import ENGINES


def cmd_import(args) -> int:
    from leanserve.hf_import import is_hf_folder
    from leanserve.importing import import_model

    repo = open_repo(args, create=True)
    if is_hf_folder(Path(args.model)):
        if args.data:
            raise InvalidInput("--data: a reference profile of a Hugging Face import is built with "
                               "leanserve profile NAME-tensors --data FILE")
        return _import_hf(args, repo)
    ref, rows = import_model(
        repo, args.model, args.name, reference_data=args.data,
        inputs=[TensorSpec.parse(s) for s in args.input] or None,
        outputs=[TensorSpec.parse(s) for s in args.output] or None,
        runtime=args.engine, check_load=not args.no_check,
        serve=True if args.serve else (False if args.register else None),
    )
    artifact = repo.get(ref.name, ref.version, verify=False)
    state = repo.state(ref.name).get(ref.version, "registered")
    print(f"imported {args.model} as {ref} ({artifact.manifest.format}, {artifact.size_bytes:,} bytes); "
          + ("it takes all traffic" if state == "serving" else
             f"registered, not served (serve it with: leanserve promote {ref})"))
    print_signature(artifact.signature)
    if rows:
        from leanserve.monitor.reference import profile_path

        print(f"reference profile for drift checks from {rows} rows: {profile_path(repo, ref.name, ref.version)}")
    return 0


def _import_hf(args, repo) -> int:
    from leanserve.hf_import import import_folder

    result = import_folder(args.model, repo, args.name, truncate=args.truncate, check=not args.no_check)
    artifact = repo.get(result.pipeline_ref.name, result.pipeline_ref.version, verify=False)
    print(f"imported {args.model} ({result.task}) as {result.pipeline_ref} with its pipeline "
          f"({artifact.size_bytes:,} bytes), and the model alone as {result.tensors_ref}")
    if result.check:
        print("checked against the library: " + ", ".join(f"{k} {v:.6g}" for k, v in result.check.items()))
    print_signature(artifact.signature)
    return 0


def cmd_export(args) -> int:
    from leanserve.from_torch import export, export_and_register, load_factory

    out = Path(args.out) if args.out else Path(f"{args.name or 'model'}.onnx")
    if not out.parent.is_dir():
        raise InvalidInput(f"--out {out}: no folder {out.parent} to write into")
    axes: dict[str, list[int]] = {}
    for item in args.dynamic_axis:
        name, _, axis = item.partition(":")
        if not axis.isdigit():
            raise InvalidInput(f"--dynamic-axis {item!r}: expected INPUT:AXIS, e.g. input_ids:1")
        axes.setdefault(name, []).append(int(axis))
    module, example = load_factory(args.factory)
    options = dict(input_names=args.input_names.split(",") if args.input_names else None,
                   output_names=args.output_names.split(",") if args.output_names else None,
                   dynamic_axes=axes or None, force=args.force,
                   **given(args, opset="opset", tolerance="tolerance", exporter="exporter"))
    if args.name:
        result, ref = export_and_register(module, example, out, open_repo(args, create=True), args.name,
                                          source=args.factory, **options)
    else:
        result, ref = export(module, example, out, **options), None
    print(f"exported {args.factory} to {out} with the {result.exporter} exporter "
          f"(max abs diff vs PyTorch {result.max_abs_diff:.3g})")
    if ref:
        print(f"imported as {ref}")
    return 0


def cmd_list(args) -> int:
    repo = open_repo(args)
    models = [{"name": name, "versions": _versions(repo, name)} for name in repo.models()]
    if args.json:
        print_json({"repo": str(repo.root), "models": models})
        return 0
    if not models:
        print(f"no models in {repo.root}")
        return 0
    print(f"{'MODEL':<24} {'VERSIONS':<16}")
    for model in models:
        print(f"{model['name']:<24} {','.join(str(v['version']) for v in model['versions']) or '-':<16}")
        for v in model["versions"]:
            size = f"{v['size_bytes']:,} bytes" if v["size_bytes"] is not None else v["error"]
            print(f"  v{v['version']:<6} {v['state']:<11} {v['format']:<13} {size}"
                  + (f"  (from {v['parent']})" if v["parent"] else ""))
    return 0


def _versions(repo, name: str) -> list[dict[str, Any]]:
    versions = repo.versions(name)
    states = repo.state(name) if versions else {}
    rows = []
    for version in versions:
        row = {"version": version, "state": states.get(version, "?"), "format": "unreadable", "size_bytes": None,
               "parent": None, "error": None}
        try:
            artifact = repo.get(name, version, verify=False)
            row.update(format=artifact.manifest.format, size_bytes=artifact.size_bytes,
                       parent=artifact.manifest.provenance.parent)
        except LeanserveError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows


def cmd_inspect(args) -> int:
    repo = open_repo(args)
    name, version = model_ref(args)
    artifact = repo.get(name, version)
    manifest = json.loads(artifact.manifest.to_json())
    info = {"model": name, "version": int(artifact.path.name), "path": str(artifact.path), "checksums": "verified",
            **manifest, "config": repo.config(name).to_dict()}
    if args.json:
        print_json(info)
        return 0
    print(f"{name}:{info['version']}  {artifact.manifest.format} via {artifact.manifest.default_runtime}  ({artifact.path})")
    print_signature(artifact.signature)
    print("provenance: " + ", ".join(f"{k}={v}" for k, v in manifest["provenance"].items() if v is not None))
    print("metrics:    " + ", ".join(f"{k}={v}" for k, v in manifest["metrics"].items()))
    print("files:      " + ", ".join(f"{k} (sha256 {v[:12]}…)" for k, v in manifest["files"].items()) + "  [verified]")
    report = artifact.path / "report.md"
    if report.is_file():
        print(f"\noptimization report ({report}, plot: {artifact.path / 'pareto.png'}):\n")
        print(report.read_text())
    return 0


def cmd_rm(args) -> int:
    name, version = model_ref(args)
    if version is None:
        raise InvalidInput("say which version to remove: leanserve rm MODEL:VERSION (or MODEL --version N)")
    print(f"removed {open_repo(args).remove(name, version)}")
    return 0


def cmd_config(args) -> int:
    from leanserve.config import ModelConfig

    repo = open_repo(args)
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
    print_json(config.to_dict())
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


def print_signature(signature) -> None:
    """The inputs and outputs of a signature, one line each."""
    for kind, specs in (("inputs ", signature.inputs), ("outputs", signature.outputs)):
        print(f"{kind}:    " + "; ".join(s.describe() for s in specs))


def register(sub) -> None:
    """Add import, export, list, inspect, rm and config."""
    p = command(sub, "import", cmd_import, "import a model file (ONNX, TorchScript, torch.export .pt2, OpenVINO .xml) "
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
                   "reference profile, against which the server checks live traffic for drift; checked before "
                   "anything is imported")
    add_repo(p)

    p = command(sub, "export", cmd_export, "export a PyTorch module to ONNX, check it against PyTorch, optionally import it",
                "leanserve export mymodel.py:build --name cnn   # build() returns (module, example_inputs)")
    p.add_argument("factory", help="FILE.py:FUNCTION returning (nn.Module, example input tensor or tuple)")
    p.add_argument("--name", help="also import the ONNX file as a new version of this model")
    p.add_argument("--out", help="ONNX file to write (default: NAME.onnx)")
    p.add_argument("--input-names", help="comma-separated input names (default: forward()'s argument names)")
    p.add_argument("--output-names", help="comma-separated output names")
    p.add_argument("--dynamic-axis", action="append", default=[], metavar="INPUT:AXIS",
                   help="make an axis dynamic besides axis 0 (the batch axis, always dynamic), e.g. input_ids:1 (repeat)")
    config_default(p.add_argument("--opset", type=int, help="ONNX opset"), "leanserve.from_torch:export", "opset")
    config_default(p.add_argument("--tolerance", type=float, help="largest abs difference from PyTorch accepted"),
                   "leanserve.from_torch:export", "tolerance")
    p.add_argument("--force", action="store_true", help="keep an export that exceeds the tolerance")
    config_default(p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"],
                                  help="ONNX exporter (auto: torch.export-based, falling back to TorchScript-based; "
                                       "torchscript gives transformer graphs ONNX Runtime can fuse)"),
                   "leanserve.from_torch:export", "exporter")
    add_repo(p)

    p = command(sub, "list", cmd_list, "list models and their versions, each with its state (serving, canary, "
                "shadow, registered, retired)", "leanserve list --repo model-repo")
    add_json(p, "the models and versions")
    add_repo(p)

    p = command(sub, "inspect", cmd_inspect, "show a version's signature, provenance, metrics and verified checksums",
                "leanserve inspect cnn:2 --repo model-repo")
    add_model_ref(p)
    add_json(p, "the full record")
    add_repo(p)

    p = command(sub, "rm", cmd_rm, "remove one version (atomically)", "leanserve rm cnn:1 --repo model-repo")
    add_model_ref(p, "MODEL:VERSION")
    add_repo(p)

    p = command(sub, "config", cmd_config, "show or change a model's settings (version policy, runtime, batching, "
                "cache, traffic); prints them as JSON",
                "leanserve config cnn --set version_policy.kind=all --set batching.max_batch_size=16")
    p.add_argument("model", help="model name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one setting (JSON value; repeat)")
    add_repo(p)
