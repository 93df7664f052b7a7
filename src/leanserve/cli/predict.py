"""``leanserve predict``: one request from a file, or a batch job over a dataset."""

from __future__ import annotations

import json
from pathlib import Path

from leanserve.cli.args import add_model_ref, add_repo, command, config_default, given, model_ref, open_repo, subject
from leanserve.errors import InvalidInput

JOB_SETTINGS = "leanserve.deploy.batch.manifest:JobSettings"


def cmd_predict(args) -> int:
    from leanserve.deploy.batch import is_dataset

    name, version = model_ref(args)
    if args.batch or is_dataset(Path(args.input)):
        return _predict_dataset(args, name, version)
    from leanserve.model import load
    from leanserve.request_files import check_output_path, outputs_as_json, read_request, write_outputs

    if args.output:
        check_output_path(args.output)  # before any work: a typo in the folder must not cost the inference
    repo = open_repo(args)
    model = load(name, subject(repo, name, version).version, repo=repo)
    inputs = read_request(args.input, model.signature)
    outputs = model.predict(inputs, args.outputs.split(",") if args.outputs else None)
    if args.output:
        write_outputs(args.output, outputs)
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        print(json.dumps(outputs_as_json(outputs)))
    return 0


def _predict_dataset(args, name: str, version: str | None) -> int:
    from leanserve.deploy.batch.version import predict_dataset

    if not args.output:
        raise InvalidInput("a batch job needs --output FOLDER (Parquet parts, rejects.jsonl and the job manifest)")
    if not Path(args.output).parent.is_dir():
        raise InvalidInput(f"--output {args.output}: no folder {Path(args.output).parent} to write into")
    repo = open_repo(args)
    if args.executor == "local":
        version = subject(repo, name, version).version
    summary = predict_dataset(repo, name, version, args.input, args.output, executor=args.executor,
                              address=args.address, actors=args.actors, allow_nonfinite=args.allow_nan,
                              **given(args, chunk_rows="chunk_rows", batch_size="batch_size", id_column="id_column"))
    resumed = f", {summary.chunks_skipped} chunk(s) already done by an earlier run" if summary.chunks_skipped else ""
    where = f"{name}:{version}" if version else name
    print(f"{where}: {summary.written:,} rows written, {summary.rejected:,} rejected "
          f"(see {Path(args.output) / 'rejects.jsonl'}){resumed}; {summary.rows_per_s:,.0f} rows/s over "
          f"{summary.chunks_done} new chunk(s) -> {args.output}")
    if args.executor == "ray":
        print(f"ray: start-up {summary.ray_start_s:.1f} s, first chunk after {summary.first_chunk_s:.1f} s "
              f"({summary.actors} actor(s)), steady {summary.steady_rows_per_s:,.0f} rows/s")
    return 0


def register(sub) -> None:
    """Add predict."""
    p = command(sub, "predict", cmd_predict,
                "run one request (.npy/.npz/.json), or a batch job over a dataset (Parquet, CSV, JSON lines, "
                "a folder of images; .npy/.npz with --batch)",
                "leanserve predict cnn --input request.npz --output result.npz\n"
                "  leanserve predict cnn --input rows.parquet --output predictions/   # batch job, resumable\n"
                "  (a batch job writes part-NNNNN.parquet files keyed by row id, rejects.jsonl and _job.json;\n"
                "   run the same command again after an interruption and it continues where it stopped)")
    add_model_ref(p)
    p.add_argument("--input", required=True, help="one request: .npy (single input), .npz (named inputs) or .json "
                   "(V2 request or {name: values}); a dataset: .parquet, .csv, .jsonl or a folder of images")
    p.add_argument("--output", help="one request: write outputs to .npz/.json/.npy instead of printing; "
                   "a batch job: the output folder")
    p.add_argument("--outputs", help="comma-separated output names (default: all)")
    p.add_argument("--batch", action="store_true", help="treat a .npy/.npz input as a dataset of rows (a batch job)")
    config_default(p.add_argument("--chunk-rows", type=int, help="batch job: rows read, run and written per chunk"),
                   JOB_SETTINGS, "chunk_rows")
    config_default(p.add_argument("--batch-size", type=int, help="batch job: rows per engine call"),
                   JOB_SETTINGS, "batch_size")
    p.add_argument("--id-column", help="batch job: the column holding row ids (default: 'id' if present, else row numbers)")
    p.add_argument("--allow-nan", action="store_true", help="batch job: pass rows with NaN/Inf to the model instead of rejecting them")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="batch job: where it runs: here (local, the default) or on Ray Data (pip install 'leanserve[ray]')")
    p.add_argument("--address", help="--executor ray: an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto; "
                   "default: start a local Ray on this machine's CPUs)")
    p.add_argument("--actors", type=int, help="--executor ray: actors in the pool, one engine session each "
                   "(default: one per CPU of the cluster)")
    add_repo(p)
