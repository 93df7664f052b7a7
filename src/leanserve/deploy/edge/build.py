"""Edge artifacts: a version turned into a small file for a device runtime, tested under a device profile.

``build_edge`` makes one of three artifacts (``--target c``, C99 sources for
microcontrollers, is built by ``c/``). ``--target ort``: the ONNX version quantized to int8 within an
accuracy budget (the optimizer's search, int8 recipes only) and converted to ONNX Runtime's ORT format
with the operator list that a reduced-size ONNX Runtime build needs (``ort_format``); a pipeline version (a text model
with its tokenizer) converts its inner model, judged on texts inside its stages, and stays a pipeline
(``pipeline``). ``--target executorch``: the
version's torch.export program lowered to an ExecuTorch program with the XNNPACK delegate, int8 (PT2E)
when within budget (``executorch``). Either runs in a child process held to a profile's threads and
memory (``device``) and is registered as a new version with a Markdown + JSON device report
(``report``). Nothing is registered when any step fails, including a run that does not fit the
profile's memory.

With evaluation data, the int8 choice is made on a selection part of it and the artifact's accuracy is
reported on the held-out rest (``leanserve.holdout``; or ``holdout_path``'s rows): both figures go into
the report and the manifest, labelled.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Provenance
from leanserve.deploy.edge.device import PROFILES, DeviceProfile, host_notes, run_on_device
from leanserve.deploy.edge.ort_format import convert_to_ort, read_operators
from leanserve.deploy.edge.pipeline import ConvertedModel, converted_model
from leanserve.deploy.edge.report import REPORT_JSON, REPORT_MD, Accuracy, EdgeReport, measure_accuracy, write_report
from leanserve.derived import HeldOut, check_not_worse
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat
from leanserve.holdout import Split
from leanserve.formats import read_model
from leanserve.measure import HIGHER_IS_BETTER, file_size
from leanserve.repository import Repository, VersionRef

log = logging.getLogger(__name__)

__all__ = ["REPORT_JSON", "REPORT_MD", "TARGETS", "DoesNotFit", "EdgeOutcome", "build_edge", "convert_to_ort"]

TARGETS = ("ort", "executorch", "c")


@dataclass(frozen=True)
class EdgeOutcome:
    """The version registered, its report and the report files inside the version."""

    ref: VersionRef
    report: EdgeReport
    files: tuple[Path, ...]


class DoesNotFit(LeanserveError):
    """The artifact could not run under the device profile; ``report`` says what was measured."""

    def __init__(self, message: str, report: EdgeReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class _Int8:
    """The ONNX variant chosen for ORT conversion: its file, recipe and what the search said of it."""

    path: Path
    recipe: str
    int8: bool
    kept_float: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Built:
    """A target's artifact before it is tested and registered: the file, the files that go with it, what
    it is and how accurate it is."""

    path: Path
    attachments: tuple[Path, ...]
    runtime: str
    recipe: str
    int8: bool
    operators: tuple[str, ...]
    accuracy: Accuracy | None
    kept_float: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    converter: str = ""
    fallbacks: tuple[str, ...] = ()  # steps done another way than planned, and why (recorded in the provenance)


def build_edge(
    repo: Repository, name: str, version: int | str | None = None, *, target: str = "ort",
    profile: DeviceProfile = PROFILES["phone"], eval_path: str | Path | None = None,
    calib_path: str | Path | None = None, max_drop: str = "1%", report_dir: str | Path | None = None,
    time_budget_s: float = 300.0, probe_time_s: float = 1.0, progress: bool = False,
    holdout_path: str | Path | None = None, holdout_fraction: float = 0.3, seed: int = 0, serve: bool = False,
    force: bool = False,
) -> EdgeOutcome:
    """Build ``target``'s artifact of ``name:version``, test it under ``profile`` and register it.

    With ``eval_path`` the int8 variants are searched within ``max_drop`` and the artifact's own accuracy
    is measured; without it, int8 is used unchecked (ORT: dynamic int8; ExecuTorch: static int8 calibrated
    on ``calib_path``, else dynamic) and the report says so. The report is also written to ``report_dir``
    when given. The choice uses a selection part of the evaluation data; the reported accuracy is
    measured on the held-out rest (``holdout_fraction`` of the rows drawn by ``seed``), or on
    ``holdout_path``'s rows when given. An artifact whose held-out accuracy drops by more than ``max_drop``
    is registered only with ``force`` (with a warning); otherwise ``derived.WorseThanParent``.
    Raises InvalidInput (unknown target, bad or too little data), UnsupportedFormat (a version or target
    that cannot be built here, saying what to do), DoesNotFit (the run under the profile failed),
    WorseThanParent; the repository is unchanged whenever it raises.
    """
    if target not in TARGETS:
        raise InvalidInput(f"unknown edge target {target!r}; choose one of {', '.join(TARGETS)}")
    from leanserve.optimize.run import evaluation_split, load_data

    artifact = repo.get(name, version)
    source = f"{name}:{artifact.path.name}"
    model = converted_model(artifact, target)  # a pipeline version: its inner model, judged inside its stages
    if target == "executorch":
        from leanserve.deploy.edge.executorch import require_executorch

        require_executorch(artifact)
    elif artifact.manifest.format not in ("onnx", "pipeline"):
        raise UnsupportedFormat(f"--target ort converts ONNX versions; {source} is {artifact.manifest.format} "
                                "(give an ONNX version or a text or image pipeline around one, or export the model "
                                "with leanserve export first)")
    if holdout_path and not eval_path:
        raise InvalidInput("--holdout DATA needs --eval DATA: the int8 choice is made on --eval's rows and the "
                           "held-out rows only grade it")
    split = evaluation_split(artifact.signature, eval_path, holdout_path, holdout_fraction, seed) if eval_path else None
    data = split.selection if split else None  # chooses; split.holdout grades
    with tempfile.TemporaryDirectory(prefix="leanserve-edge-") as tmp:
        work = Path(tmp)
        if target == "ort":
            built = _build_ort(repo, name, model, split, calib_path, max_drop, time_budget_s, progress, work)
        else:
            calib = load_data(calib_path, artifact.signature, "calibration") if calib_path else None
            built = _build_pte(artifact, data, calib, max_drop, work)
        held_out = (measure_accuracy(artifact, built.path, split.holdout, max_drop, original=model.path, load=model.load)
                    if split else None)
        run = run_on_device(built.path, _samples(model, data), profile, min_time_s=probe_time_s)
        report = EdgeReport(
            source=source, target=target, artifact_file=built.path.name, recipe=built.recipe, int8=built.int8,
            original_bytes=_model_bytes(model.path), artifact_bytes=file_size(built.path), operators=built.operators,
            profile=profile, device=run, accuracy=held_out, kept_float=built.kept_float,
            notes=_holdout_notes(split, built.accuracy) + built.notes + model.stage_notes() + host_notes(profile))
        files = write_report(report, work / "report")
        if report_dir:
            files_out = write_report(report, Path(report_dir))
            log.info("device report written to %s", ", ".join(map(str, files_out)))
        if not run.fits:
            raise DoesNotFit(f"{source} as {target} did not run within the {profile.describe()} profile: {run.error}; "
                             "choose a larger profile or raise --memory-mb (nothing was registered)", report)
        forced = check_not_worse(held_out_figure(held_out), force, f"the {target} artifact of {source}")
        metrics = _metrics(report, built.accuracy, split) | ({"registered_with_force": forced} if forced else {})
        ref = model.register(repo, name, built.path, provenance=_provenance(source, target, built),
                             metrics=metrics, attachments=[*built.attachments, *files],
                             runtime=built.runtime, serve=serve)  # a device artifact takes server traffic only when asked
        stored = repo.get(ref.name, ref.version, verify=False).path
    return EdgeOutcome(ref, report, tuple(stored / f.name for f in files))


def _build_ort(repo, name, model: ConvertedModel, split, calib_path, max_drop, time_budget_s, progress, work) -> _Built:
    data = split.selection if split else None
    variant = (_search_int8(repo, name, model, split, calib_path, max_drop, time_budget_s, progress, work)
               if split is not None else _dynamic_int8(model, work))
    ort_file, operators_file = convert_to_ort(variant.path, work / "ort")
    accuracy = (measure_accuracy(model.version, ort_file, data, max_drop, original=model.path, load=model.load)
                if data is not None else None)
    return _Built(ort_file, (operators_file,), "onnxruntime", variant.recipe, variant.int8,
                  tuple(read_operators(operators_file)), accuracy, variant.kept_float, variant.notes,
                  "onnxruntime.tools.convert_onnx_models_to_ort (fixed optimizations)")


def _build_pte(artifact: ModelArtifact, data, calib, max_drop: str, work: Path) -> _Built:
    from leanserve.deploy.edge.executorch import choose_program

    program = choose_program(artifact, work / "pte", data=data, calib=calib,
                             check=lambda path: measure_accuracy(artifact, path, data, max_drop))
    notes = (*program.notes, "the device run uses ExecuTorch's Python runtime, which links libtorch; a device links "
             "only the C++ runtime and the XNNPACK delegate, so its memory is the program's share")
    return _Built(program.path, (), "executorch", program.recipe.name, program.recipe.int8, program.operators,
                  program.accuracy, notes=notes,
                  converter="torch.export + executorch.exir.to_edge_transform_and_lower (XnnpackPartitioner)",
                  fallbacks=_program_fallbacks(artifact) + program.fallbacks)


def _program_fallbacks(artifact: ModelArtifact) -> tuple[str, ...]:
    """The version's torch.export program, when it was kept with fixed shapes, says so (torch_source)."""
    from leanserve.torch_source import PROGRAM_FILE, program_export_info

    path = artifact.path / PROGRAM_FILE
    fallback = program_export_info(path).get("fallback") if path.is_file() else None
    return (f"torch.export program: {fallback}",) if fallback else ()


# --- int8 -------------------------------------------------------------------------------------------

def int8_recipes(model: Path | None = None) -> list:
    """The optimizer's recipes that make small models any ONNX Runtime CPU build runs: int8, 4-bit weights
    for the linear layers with int8 for the rest, and for ``model``s with a vocabulary-sized embedding
    table 4-bit rows for it with int8 for the rest (MatMulNBits and GatherBlockQuantized are CPU kernels of
    every build that keeps the com.microsoft operators; the required-operators config lists them)."""
    from leanserve.optimize.quantize import has_large_embedding
    from leanserve.optimize.recipe import Recipe, Step

    # smallest first: on a device, size is what the search is for
    embeddings = ([Recipe("int4 embeddings + dynamic int8", (Step("int4_embeddings"), Step("dynamic_int8")))]
                  if model is not None and has_large_embedding(model) else [])
    return [*embeddings,
            Recipe("int4 linear weights + dynamic int8", (Step("int4_weights"), Step("dynamic_int8"))),
            _dynamic_int8_recipe(),
            Recipe("static int8 (minmax)", (Step("static_int8", {"method": "minmax"}),))]


def _dynamic_int8_recipe():
    from leanserve.optimize.recipe import Recipe, Step

    return Recipe("dynamic int8", (Step("dynamic_int8"),))


def _search_int8(repo, name, model: ConvertedModel, split, calib_path, max_drop, time_budget_s, progress,
                 work) -> _Int8:
    """The smallest int8 candidate within budget from the optimizer's search (recreated here, because the
    search keeps its files only while it runs); the fp32 original, said plainly, when none is. A pipeline
    version's candidates are judged inside its stages on texts, and static int8 calibrates on tokens."""
    from leanserve.optimize.recipe import apply_recipe
    from leanserve.optimize.run import load_data, optimize
    from leanserve.optimize.steps import PassContext

    artifact, data = model.version, split.selection
    outcome = optimize(repo, name, artifact.path.name, split=split, calib_path=calib_path, max_drop=max_drop,
                       recipes=int8_recipes(model.path), time_budget_s=time_budget_s,
                       register=False, progress=progress, report_dir=work / "search")
    within = [c for c in outcome.result.candidates
              if c.within_budget and c.recipe.quantizes and c.measurement and c.error is None]
    if not within:
        tried = "; ".join(f"{c.recipe.name}: {'failed' if c.error else f'drop {c.drop:+.4f}'}"
                          for c in outcome.result.candidates) or "none tried"
        return _Int8(model.path, "original", False,
                     notes=(f"no int8 variant stayed within --max-accuracy-drop {max_drop} ({tried}); "
                            "the artifact is the fp32 original",))
    best = min(within, key=lambda c: (c.measurement.size_bytes, c.measurement.speed.latency_p50_ms))
    calib = load_data(calib_path, artifact.signature, "calibration") if calib_path else data
    calib = model.tensors(calib)
    path = work / "int8" / "model.onnx"
    path.parent.mkdir()
    notes = apply_recipe(best.recipe, model.path, path, PassContext(model.signature, calib, best.kept_float))
    return _Int8(path, best.recipe.name, True, best.kept_float, tuple(notes))


def _dynamic_int8(model: ConvertedModel, work: Path) -> _Int8:
    from leanserve.optimize.recipe import apply_recipe
    from leanserve.optimize.steps import PassContext

    path = work / "int8" / "model.onnx"
    path.parent.mkdir()
    notes = apply_recipe(_dynamic_int8_recipe(), model.path, path, PassContext(model.signature))
    return _Int8(path, "dynamic int8", True, notes=(
        *notes, "accuracy was not checked: dynamic int8 was applied without evaluation data (pass --eval DATA)"))


def _model_bytes(model_path: Path) -> int:
    source = read_model(model_path)
    return file_size(source.model_file) + sum(file_size(f) for f in source.extra_files)


def _samples(model: ConvertedModel, data) -> dict[str, np.ndarray]:
    """Rows the device run feeds the model: up to 64 of the selection data (a pipeline's as token tensors)."""
    if data is None:
        from leanserve.runtime import example_inputs

        return example_inputs(model.signature)
    return model.tensors({n: data[n][:64] for n in model.version.signature.input_names})


# --- registering ------------------------------------------------------------------------------------

def _provenance(source: str, target: str, built: _Built) -> Provenance:
    return Provenance(source=f"leanserve edge {source} --target {target}", parent=source,
                      recipe={"name": built.recipe, "target": target, "kept_float": list(built.kept_float),
                              "converter": built.converter, "fallbacks": list(built.fallbacks)})


def held_out_figure(accuracy: Accuracy | None) -> HeldOut | None:
    """The artifact's held-out accuracy beside the original's, with the budget; None when not measured."""
    if accuracy is None:
        return None
    return HeldOut(accuracy.metric, accuracy.original, accuracy.artifact, accuracy.allowed_drop,
                   HIGHER_IS_BETTER.get(accuracy.metric, True))


def _holdout_notes(split: Split | None, selection: Accuracy | None) -> tuple[str, ...]:
    """What the report's accuracy line was measured on, and the selection figure beside it."""
    if split is None or selection is None:
        return ()
    return (f"accuracy above: held-out rows the choice never saw ({split.info.describe()}); on the selection rows "
            f"that chose the artifact: {selection.metric} {selection.artifact:.4f} vs {selection.original:.4f} "
            f"(drop {selection.drop:+.4f})",)


def _metrics(report: EdgeReport, selection: Accuracy | None = None, split: Split | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"edge_target": report.target, "edge_profile": report.profile.name,
                               "size_ratio_vs_fp32": round(report.size_ratio, 4),
                               "device_peak_rss_mb": report.device.peak_rss_mb,
                               "device_runtime_rss_mb": report.device.runtime_rss_mb,
                               "device_latency_p50_ms": report.device.latency_p50_ms,
                               "device_latency_p99_ms": report.device.latency_p99_ms}
    if report.accuracy:  # measured on the held-out rows; the selection figure chose the artifact
        metric = report.accuracy.metric
        metrics[f"holdout_{metric}"] = round(report.accuracy.artifact, 6)
        metrics[f"holdout_{metric}_drop"] = round(report.accuracy.drop, 6)
        metrics[f"baseline_holdout_{metric}"] = round(report.accuracy.original, 6)
    if selection:
        metrics[f"selection_{selection.metric}"] = round(selection.artifact, 6)
        metrics[f"selection_{selection.metric}_drop"] = round(selection.drop, 6)
    if split:
        metrics["holdout_split"] = split.info.to_dict()
    return metrics
