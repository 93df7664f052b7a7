"""``leanserve optimize``: from a repository version and data, search for faster variants and register
the fastest one within the accuracy budget as a new version, with its report.

The evaluation data is split (seeded, sizes recorded) into a selection part, on which the search
chooses, and a held-out part, on which the chosen variant's quality is reported; ``--holdout DATA``
gives the held-out part instead. The manifest and the report carry both figures, labelled."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from leanserve.artifact import Provenance, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat
from leanserve.derived import HeldOut, check_not_worse
from leanserve.holdout import Split, given_holdout, split_holdout
from leanserve.measure import HIGHER_IS_BETTER, LABELS, choose_metric
from leanserve.optimize.recipe import Recipe, default_recipes, engine_recipes
from leanserve.optimize.report import write_report
from leanserve.optimize.search import SearchResult, Searcher, parse_budget
from leanserve.repository import Repository, VersionRef
from leanserve.runtime import engine_module

log = logging.getLogger(__name__)


@dataclass
class OptimizeOutcome:
    """The search result, the version registered (None when the original stays best) and the report files."""

    result: SearchResult
    ref: VersionRef | None
    report_files: list[Path]


def load_data(path: str | Path, signature: Signature, what: str) -> dict[str, np.ndarray]:
    """Read a .npz of named input arrays (plus optional ``labels``) and check it against the signature."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        raise InvalidInput(f"{what} data {path}: expected an existing .npz file with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # truncated, or not a .npz inside
        hint = ("; save texts as a str array and images as a bytes array, e.g. np.array(list_of_png_bytes, "
                "dtype=bytes), since object arrays are refused (loading them would run pickle)"
                if "allow_pickle" in str(exc) else "")
        raise InvalidInput(f"{what} data {path}: not a readable .npz file ({exc}){hint}") from None
    missing = [n for n in signature.input_names if n not in data]
    if missing:
        raise InvalidInput(f"{what} data {path.name} has no array for input {missing[0]!r} (has: {', '.join(data)})")
    rows = {len(data[n]) for n in [*signature.input_names, *([LABELS] if LABELS in data else [])]}
    if len(rows) != 1 or 0 in rows:
        raise InvalidInput(f"{what} data {path.name}: every array needs the same, non-zero number of rows; got {sorted(rows)}")
    signature.validate_inputs({n: data[n][:1] for n in signature.input_names})
    return data


def evaluation_split(signature: Signature, eval_path: str | Path, holdout_path: str | Path | None = None,
                     holdout_fraction: float = 0.3, seed: int = 0) -> Split:
    """The evaluation data as selection and held-out parts: ``holdout_path``'s rows held out when given,
    else a seeded split of ``eval_path``'s rows. Raises InvalidInput for unusable files or too few rows."""
    keep = (*signature.input_names, LABELS)  # other arrays in the file may have other row counts
    data = {k: v for k, v in load_data(eval_path, signature, "evaluation").items() if k in keep}
    if holdout_path:
        held = load_data(holdout_path, signature, "held-out")
        return given_holdout(data, {k: v for k, v in held.items() if k in keep})
    return split_holdout(data, holdout_fraction, seed)


def looks_like_transformer(path: Path) -> bool:
    """A graph with attention (Softmax between MatMuls) and layer norms is treated as BERT-like."""
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return "Softmax" in ops and ops.count("MatMul") >= 4 and ("LayerNormalization" in ops or "ReduceMean" in ops)


def optimize(
    repo: Repository, name: str, version: int | str | None = None, *, eval_path: str | Path | None = None,
    holdout_path: str | Path | None = None, holdout_fraction: float = 0.3, seed: int = 0, split: Split | None = None,
    calib_path: str | Path | None = None, max_drop: str = "0.5%", metric: str | None = None,
    recipes: Sequence[Recipe] | None = None, time_budget_s: float = 600, objective: str = "latency",
    batch_size: int = 32, report_dir: str | Path | None = None, register: bool = True, progress: bool = True,
    options: RuntimeOptions | None = None, variants: Mapping[str, Path] | None = None,
    engines: Sequence[str] = ("onnxruntime",), serve: bool = False, force: bool = False,
) -> OptimizeOutcome:
    """Search for the fastest variant of ``name:version`` within ``max_drop`` and register it.

    ``engines`` adds each engine's own candidates (the original as that engine runs it, and its int8
    where it has one) to ONNX Runtime's recipes; the winner is registered with its engine recorded, and
    the server loads it with that engine. Engines not installed raise UnsupportedFormat naming the extra.

    ``variants`` adds ready-made ONNX files to the candidates (see ``torch_variants``: pruned and
    distilled students of the model's PyTorch source), measured exactly like the recipes' outputs.

    The search chooses on a selection part of ``eval_path`` and grades every candidate on the rest
    (``holdout_fraction`` of the rows, drawn by ``seed``), or on ``holdout_path``'s rows when given;
    ``split`` passes parts already made (instead of the paths). Without ``calib_path`` static int8
    calibrates on the selection inputs, never the held-out ones.

    The chosen variant is registered only when its held-out quality is within ``max_drop`` of the
    original's on the same rows; otherwise ``derived.WorseThanParent`` is raised (naming both figures) and
    nothing is registered, unless ``force``, which registers it with a warning in the log and the manifest.

    Raises InvalidInput for unusable data or budget (including too few rows to hold some out),
    UnsupportedFormat for non-ONNX versions, WorseThanParent as above.
    """
    artifact = repo.get(name, version)
    pipeline = None
    if artifact.manifest.format == "pipeline":  # the inner model is searched, judged inside the stages
        from leanserve.optimize.pipeline import pipeline_target

        pipeline = pipeline_target(artifact)
        if tuple(engines) != ("onnxruntime",):
            raise InvalidInput("a pipeline version is optimized with ONNX Runtime's recipes only (its pipeline.json "
                               "holds an ONNX model); leave out --engines")
    elif artifact.manifest.format != "onnx":
        raise UnsupportedFormat(f"optimize works on ONNX versions; {name} is {artifact.manifest.format} "
                                "(export it with leanserve export first)")
    if objective not in ("latency", "throughput"):
        raise InvalidInput(f"objective must be latency or throughput, got {objective!r}")
    budget = parse_budget(max_drop)
    if split is None:
        if eval_path is None:
            raise InvalidInput("optimize needs evaluation data: pass eval_path (--eval DATA)")
        split = evaluation_split(artifact.signature, eval_path, holdout_path, holdout_fraction, seed)
    eval_data = split.selection
    calib = load_data(calib_path, artifact.signature, "calibration") if calib_path else None
    if calib is None:
        log.warning("no --calib data: static quantization calibrates on the selection part of the evaluation inputs")
        calib = {n: eval_data[n] for n in artifact.signature.input_names}
    metric = choose_metric(eval_data, metric)
    options = options or repo.config(name).runtime
    model_path, model_signature, wrap = artifact.model_path, artifact.signature, None
    if pipeline is not None:
        from leanserve.optimize.pipeline import judging_wrapper, stage_inputs

        calib = stage_inputs(pipeline, calib)  # token (or pixel) tensors, as the stages make them
        model_path, model_signature, wrap = pipeline.model_path, pipeline.inner_signature, judging_wrapper(pipeline)
        options = replace(options, engine=None)  # the pipeline's model runs on ONNX Runtime
    transformer = looks_like_transformer(model_path)
    for engine in engines:
        engine_module(engine)  # fail now, naming the extra to install, not after minutes of search
    if recipes is not None:
        chosen_recipes = list(recipes)
    else:
        chosen_recipes = default_recipes(transformer, calib is not None) if "onnxruntime" in engines else []
        for engine in engines:
            if engine != "onnxruntime":
                chosen_recipes += engine_recipes(engine, calib is not None)
    with tempfile.TemporaryDirectory() as tmp:
        searcher = Searcher(model_path, model_signature, eval_data, calib, metric, budget, Path(tmp),
                            options=options, batch_size=batch_size, time_budget_s=time_budget_s,
                            objective=objective, progress=progress, wrap=wrap)
        result = searcher.run(chosen_recipes, variants)
        searcher.grade_holdout(result, split.holdout, split.info)
        folder = Path(report_dir) if report_dir else Path(tmp) / "report"
        files = write_report(result, folder)
        ref = None
        if register and result.chosen is not None and result.chosen is not result.baseline:
            warning = check_not_worse(held_out_figure(result), force, f"the chosen variant ({result.chosen.recipe.name})")
            attachments = files + _trt_calibration(result, model_signature, calib, Path(tmp) / "trt")
            ref = _register(repo, name, artifact.path.name, result, attachments, serve, pipeline, warning)
            from leanserve.monitor.reference import build_reference

            build_reference(repo, ref.name, ref.version, {n: np.concatenate([split.selection[n], split.holdout[n]])
                                                          for n in artifact.signature.input_names})
        if not report_dir:  # the temp folder goes away: point at the copies in the new version
            files = [repo.get(ref.name, ref.version, verify=False).path / f.name for f in files] if ref else []
    return OptimizeOutcome(result, ref, files)


def _trt_calibration(result: SearchResult, signature: Signature, calib, folder: Path) -> list[Path]:
    """A float winner served by ONNX Runtime carries a TensorRT int8 calibration table, so a GPU machine
    can serve it with runtime.precision=int8 without the calibration data (int8 winners have QDQ scales)."""
    chosen = result.chosen
    if calib is None or chosen.recipe.engine != "onnxruntime" or chosen.recipe.quantizes or chosen.path.suffix != ".onnx":
        return []
    from leanserve.optimize.quantize import write_trt_calibration
    from leanserve.optimize.steps import PassContext

    try:
        return write_trt_calibration(chosen.path, folder, PassContext(signature, calib))
    except (LeanserveError, RuntimeError, ValueError, OSError) as exc:  # a missing table only costs TensorRT int8
        log.warning("no TensorRT calibration table for the chosen variant: %s", exc)
        return []


def held_out_figure(result: SearchResult) -> HeldOut | None:
    """The chosen variant's held-out quality beside the original's, with the budget in the metric's units;
    None when the candidates were not graded on held-out rows (or the chosen one could not be)."""
    chosen, base = result.chosen, result.baseline
    if result.holdout is None or chosen.holdout_quality is None or base.holdout_quality is None:
        return None
    return HeldOut(result.metric, base.holdout_quality, chosen.holdout_quality,
                   result.budget.allowed(base.holdout_quality), HIGHER_IS_BETTER.get(result.metric, True))


def _register(repo: Repository, name: str, parent: str, result: SearchResult, files: list[Path],
              serve: bool = False, pipeline=None, forced: str | None = None) -> VersionRef:
    """Register the chosen variant; it takes traffic only with ``serve`` (otherwise ``promote``/``canary``).
    With ``pipeline`` (an ``optimize.pipeline.PipelineTarget``) it is registered inside the parent's pipeline."""
    chosen = result.chosen
    m = chosen.measurement
    metrics = {
        "latency_p50_ms": round(m.speed.latency_p50_ms, 4), "latency_p99_ms": round(m.speed.latency_p99_ms, 4),
        "throughput_rows_s": round(m.speed.throughput_rows_s, 1), "batch_size": m.speed.batch_size,
        "baseline_latency_p50_ms": round(result.baseline.measurement.speed.latency_p50_ms, 4),
        **quality_metrics(result),
    }
    metrics["engine"] = chosen.recipe.engine
    if result.skipped:
        metrics["recipes_skipped_time_budget"] = list(result.skipped)
    if forced:
        metrics["registered_with_force"] = forced
    provenance = Provenance(source=f"leanserve optimize {name}:{parent}", parent=f"{name}:{parent}",
                            recipe={**chosen.recipe.to_dict(), "kept_float": list(chosen.kept_float)})
    model_file = chosen.path
    if chosen.path.suffix == ".onnx":
        model_file = chosen.path.with_name("model.onnx")
        shutil.copyfile(chosen.path, model_file)
    if pipeline is not None:
        from leanserve.optimize.pipeline import register_pipeline

        metrics["judged_output"] = pipeline.judged
        return register_pipeline(repo, name, pipeline, model_file, provenance=provenance, metrics=metrics,
                                 attachments=files, serve=serve)
    return repo.add(model_file, name, provenance=provenance, metrics=metrics, attachments=files,
                    runtime=chosen.recipe.engine, serve=serve)


def quality_metrics(result: SearchResult) -> dict:
    """The chosen variant's and the baseline's quality, labelled by the part of the data that measured
    it: ``selection_top1`` chose it, ``holdout_top1`` is the figure to trust; ``holdout_split`` says how
    many rows each part had and how they were drawn."""
    chosen, base, metric = result.chosen, result.baseline, result.metric
    metrics = {f"selection_{metric}": chosen.measurement.quality, f"selection_{metric}_drop": chosen.drop,
               f"baseline_selection_{metric}": base.measurement.quality}
    if result.holdout is not None:
        metrics |= {f"holdout_{metric}": chosen.holdout_quality, f"holdout_{metric}_drop": chosen.holdout_drop,
                    f"baseline_holdout_{metric}": base.holdout_quality, "holdout_split": result.holdout.to_dict()}
    return metrics


def torch_variants(module, example_inputs, x_train, y_train, folder: str | Path, *, input_names, output_names,
                   prune_ratio: float = 0.5, student_width: float = 0.45, epochs: int = 10,
                   progress: bool = True) -> dict[str, Path]:
    """Build PyTorch-side candidates of a classifier and export them next to each other in ``folder``:
    structured pruning with fine-tuning, and a distilled narrower student. Returns name -> ONNX path,
    ready for ``optimize(..., variants=...)``."""
    import copy

    from leanserve.from_torch import export
    from leanserve.optimize.distill import distill, width_student
    from leanserve.optimize.prune import iterative_prune_and_finetune

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pruned = iterative_prune_and_finetune(copy.deepcopy(module), example_inputs, x_train, y_train,
                                          target_ratio=prune_ratio, progress=progress).module
    student = distill(module, width_student(module, example_inputs, student_width), x_train, y_train,
                      epochs=epochs, progress=progress).student
    paths = {}
    for name, model in ((f"structured pruning {prune_ratio:.0%} + fine-tune", pruned),
                        (f"distilled student (width x{student_width:g})", student)):
        path = folder / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".onnx")
        export(model.eval(), example_inputs, path, input_names=input_names, output_names=output_names)
        paths[name] = path
    return paths
