"""Edge artifacts: a version turned into a small file for a device runtime, tested under a device profile.

``build_edge`` quantizes an ONNX version to int8 within an accuracy budget (the optimizer's search, int8
recipes only), converts it to ONNX Runtime's ORT format with the operator list that a reduced-size
ONNX Runtime build needs, runs it in a child process held to a profile's threads and memory
(``edge_device``), and registers it as a new version with a Markdown + JSON device report. Nothing is
registered when any step fails, including a run that does not fit the profile's memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Provenance, Signature
from leanserve.deploy.edge_device import PROFILES, DeviceProfile, DeviceRun, host_notes, run_on_device
from leanserve.errors import InvalidInput, LeanserveError, ModelLoadError, UnsupportedFormat
from leanserve.formats import read_model
from leanserve.measure import METRICS, choose_metric, cpu_description, file_size, quality_drop, run_all
from leanserve.repository import Repository, VersionRef

log = logging.getLogger(__name__)

TARGETS = ("ort", "executorch")
MODEL_FILE = "model.ort"
OPERATORS_FILE = "model.required_operators.config"  # the name ONNX Runtime's converter gives it
REPORT_MD = "edge-report.md"
REPORT_JSON = "edge-report.json"
EXECUTORCH_PIN = "executorch==1.4.1"


@dataclass(frozen=True)
class Accuracy:
    """The artifact's quality next to the original's on the same evaluation data."""

    metric: str
    original: float
    artifact: float
    drop: float
    allowed_drop: float


@dataclass(frozen=True)
class EdgeReport:
    """Everything the device report says; ``to_dict`` is the JSON, ``to_markdown`` the Markdown."""

    source: str
    target: str
    recipe: str
    int8: bool
    original_bytes: int
    artifact_bytes: int
    operators: tuple[str, ...]
    profile: DeviceProfile
    device: DeviceRun
    accuracy: Accuracy | None
    kept_float: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    host: dict[str, Any] = field(default_factory=cpu_description)

    @property
    def size_ratio(self) -> float:
        return self.artifact_bytes / self.original_bytes

    def to_dict(self) -> dict[str, Any]:
        import onnxruntime

        return {**asdict(self), "size_ratio": round(self.size_ratio, 4), "accuracy_checked": self.accuracy is not None,
                "onnxruntime_version": onnxruntime.__version__}

    def to_markdown(self) -> str:
        run, acc = self.device, self.accuracy
        lines = [f"# Edge artifact: {self.source} for {self.target}", "",
                 f"- artifact: {MODEL_FILE} ({self.recipe}{', int8' if self.int8 else ', fp32'})",
                 f"- size: {self.artifact_bytes:,} bytes, {self.size_ratio:.1%} of the fp32 original "
                 f"({self.original_bytes:,} bytes)"]
        if acc is None:
            lines.append("- accuracy: **not checked** (no evaluation data given; pass --eval DATA to check it)")
        else:
            verdict = "within" if acc.drop <= acc.allowed_drop + 1e-12 else "OUTSIDE"
            lines.append(f"- accuracy ({acc.metric}): {acc.artifact:.4f} vs {acc.original:.4f} for the original "
                         f"(drop {acc.drop:+.4f}, {verdict} the allowed {acc.allowed_drop:.4f})")
        if self.kept_float:
            lines.append(f"- kept in float for accuracy: {', '.join(self.kept_float)}")
        lines += ["", f"## Under the {self.profile.describe()} profile", ""]
        if run.fits:
            lines += [f"- peak memory (resident, of the child process): {run.peak_rss_mb:.1f} MB "
                      f"of {self.profile.memory_mb} MB",
                      f"- latency at batch 1: p50 {run.latency_p50_ms:.3f} ms, p99 {run.latency_p99_ms:.3f} ms "
                      f"({run.runs} runs, {self.profile.threads} intra-op thread(s)); load {run.load_ms:.1f} ms"]
        else:
            lines.append(f"- **did not run within the profile's {self.profile.memory_mb} MB memory cap "
                         f"({self.profile.threads} thread(s))**: {run.error}")
        lines.append(f"- measured on this machine: {self.host['model']} ({self.host['cores']} cores; "
                     f"{', '.join(self.host['flags']) or 'no AVX2/VNNI'}), not on the device itself")
        lines += ["", f"## Operators ({len(self.operators)}; {OPERATORS_FILE} configures a reduced-size "
                  "ONNX Runtime build with exactly these)", "", *(f"- {op}" for op in self.operators)]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"


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
    """The variant chosen for conversion: its ONNX file, recipe and what the search said of it."""

    path: Path
    recipe: str
    int8: bool
    kept_float: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def build_edge(
    repo: Repository, name: str, version: int | str | None = None, *, target: str = "ort",
    profile: DeviceProfile = PROFILES["phone"], eval_path: str | Path | None = None,
    calib_path: str | Path | None = None, max_drop: str = "1%", report_dir: str | Path | None = None,
    time_budget_s: float = 300.0, probe_time_s: float = 1.0, progress: bool = False,
) -> EdgeOutcome:
    """Build ``target``'s artifact of ``name:version``, test it under ``profile`` and register it.

    With ``eval_path`` the int8 variants are searched within ``max_drop`` and the artifact's own accuracy
    is measured; without it, dynamic int8 is used and the report says accuracy was not checked. The
    report is also written to ``report_dir`` when given. Raises InvalidInput (unknown target, bad data),
    UnsupportedFormat (a version or target that cannot be built here), DoesNotFit (the run under the
    profile failed); the repository is unchanged whenever it raises.
    """
    if target not in TARGETS:
        raise InvalidInput(f"unknown edge target {target!r}; choose one of {', '.join(TARGETS)}")
    artifact = repo.get(name, version)
    source = f"{name}:{artifact.path.name}"
    if target == "executorch":
        raise UnsupportedFormat(executorch_missing(artifact))
    if artifact.manifest.format != "onnx":
        raise UnsupportedFormat(f"--target ort converts ONNX versions; {source} is {artifact.manifest.format} "
                                "(give an ONNX version, or export the model with leanserve export first)")
    from leanserve.optimize.run import load_data

    data = load_data(eval_path, artifact.signature, "evaluation") if eval_path else None
    with tempfile.TemporaryDirectory(prefix="leanserve-edge-") as tmp:
        work = Path(tmp)
        variant = (_search_int8(repo, name, artifact, data, eval_path, calib_path, max_drop, time_budget_s, progress, work)
                   if data is not None else _dynamic_int8(artifact, work))
        ort_file, operators_file = convert_to_ort(variant.path, work / "ort")
        accuracy = _accuracy(artifact, ort_file, data, max_drop) if data is not None else None
        samples = _samples(artifact.signature, data)
        run = run_on_device(ort_file, samples, profile, min_time_s=probe_time_s)
        report = EdgeReport(
            source=source, target=target, recipe=variant.recipe, int8=variant.int8,
            original_bytes=_model_bytes(artifact), artifact_bytes=file_size(ort_file),
            operators=tuple(read_operators(operators_file)), profile=profile, device=run, accuracy=accuracy,
            kept_float=variant.kept_float, notes=variant.notes + host_notes(profile))
        files = write_report(report, work / "report")
        if report_dir:
            files_out = write_report(report, Path(report_dir))
            log.info("device report written to %s", ", ".join(map(str, files_out)))
        if not run.fits:
            raise DoesNotFit(f"{source} as {target} did not run within the {profile.describe()} profile: {run.error}; "
                             "choose a larger profile or raise --memory-mb (nothing was registered)", report)
        ref = repo.add(ort_file, name, provenance=_provenance(source, variant), metrics=_metrics(report),
                       attachments=[operators_file, *files], runtime="onnxruntime")
        stored = repo.get(ref.name, ref.version, verify=False).path
    return EdgeOutcome(ref, report, tuple(stored / f.name for f in files))


# --- int8 -------------------------------------------------------------------------------------------

def int8_recipes() -> list:
    """The optimizer's recipes that make small models any ONNX Runtime CPU build runs: int8, and 4-bit
    weights for the linear layers with int8 for the rest (MatMulNBits is a CPU kernel of every build that
    keeps the com.microsoft operators; the required-operators config lists it)."""
    from leanserve.optimize.recipe import Recipe, Step

    # smallest first: on a device, size is what the search is for
    return [Recipe("int4 linear weights + dynamic int8", (Step("int4_weights"), Step("dynamic_int8"))),
            Recipe("dynamic int8", (Step("dynamic_int8"),)),
            Recipe("static int8 (minmax)", (Step("static_int8", {"method": "minmax"}),))]




def _search_int8(repo, name, artifact, data, eval_path, calib_path, max_drop, time_budget_s, progress, work) -> _Int8:
    """The smallest int8 candidate within budget from the optimizer's search (recreated here, because the
    search keeps its files only while it runs); the fp32 original, said plainly, when none is."""
    from leanserve.optimize.recipe import apply_recipe
    from leanserve.optimize.run import load_data, optimize
    from leanserve.optimize.steps import PassContext

    outcome = optimize(repo, name, artifact.path.name, eval_path=eval_path, calib_path=calib_path, max_drop=max_drop,
                       recipes=int8_recipes(), time_budget_s=time_budget_s,
                       register=False, progress=progress, report_dir=work / "search")
    within = [c for c in outcome.result.candidates
              if c.within_budget and c.recipe.quantizes and c.measurement and c.error is None]
    if not within:
        tried = "; ".join(f"{c.recipe.name}: {'failed' if c.error else f'drop {c.drop:+.4f}'}"
                          for c in outcome.result.candidates) or "none tried"
        return _Int8(artifact.model_path, "original", False,
                     notes=(f"no int8 variant stayed within --max-accuracy-drop {max_drop} ({tried}); "
                            "the artifact is the fp32 original",))
    best = min(within, key=lambda c: (c.measurement.size_bytes, c.measurement.speed.latency_p50_ms))
    calib = load_data(calib_path, artifact.signature, "calibration") if calib_path else data
    calib = {n: calib[n] for n in artifact.signature.input_names}
    path = work / "int8" / "model.onnx"
    path.parent.mkdir()
    notes = apply_recipe(best.recipe, artifact.model_path, path, PassContext(artifact.signature, calib, best.kept_float))
    return _Int8(path, best.recipe.name, True, best.kept_float, tuple(notes))


def _dynamic_int8(artifact: ModelArtifact, work: Path) -> _Int8:
    from leanserve.optimize.recipe import apply_recipe
    from leanserve.optimize.steps import PassContext

    path = work / "int8" / "model.onnx"
    path.parent.mkdir()
    notes = apply_recipe(int8_recipes()[1], artifact.model_path, path, PassContext(artifact.signature))
    return _Int8(path, "dynamic int8", True, notes=(
        *notes, "accuracy was not checked: dynamic int8 was applied without evaluation data (pass --eval DATA)"))


def _accuracy(artifact: ModelArtifact, ort_file: Path, data, max_drop: str) -> Accuracy:
    """The original's and the ORT file's quality on the evaluation data, each run by leanserve's engine."""
    from leanserve.optimize.search import parse_budget

    metric = choose_metric(data)
    inputs = {n: data[n] for n in artifact.signature.input_names}
    original = _outputs(artifact.model_path, inputs)
    converted = _outputs(ort_file, inputs)
    base = METRICS[metric](original, data, original)
    mine = METRICS[metric](converted, data, original)
    return Accuracy(metric, base, mine, quality_drop(metric, base, mine), parse_budget(max_drop).allowed(base))


def _outputs(path: Path, inputs) -> dict[str, np.ndarray]:
    from leanserve.runtime import load_file

    session = load_file(path)
    try:
        return run_all(session, inputs)
    finally:
        session.close()


# --- ORT format -------------------------------------------------------------------------------------

def convert_to_ort(onnx_path: Path, folder: Path) -> tuple[Path, Path]:
    """Convert an ONNX file to ORT format with ONNX Runtime's own converter; returns (model.ort, operator
    config). Fixed optimizations are baked in, without NCHWc layouts, so the file runs on ARM as on x86.
    Raises ModelLoadError when ONNX Runtime cannot convert the model."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "model.onnx"  # the converter names its outputs after the input file
    if Path(onnx_path).resolve() != staged.resolve():
        staged.write_bytes(Path(onnx_path).read_bytes())
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet(logging.getLogger("ort_format_model.utils")):
            convert_onnx_models_to_ort(staged, output_dir=folder / "out", optimization_styles=[OptimizationStyle.Fixed])
    except (RuntimeError, ValueError, OSError, ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument,
            ort_errors.NotImplemented, ort_errors.RuntimeException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"ONNX Runtime cannot convert {Path(onnx_path).name} to ORT format: {reason}") from exc
    return folder / "out" / MODEL_FILE, folder / "out" / OPERATORS_FILE


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    # the converter prints its progress and logs each config file it writes at INFO
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_operators(config: Path) -> list[str]:
    """``domain:Op (opset N)`` for each line ``domain;opset;Op1,Op2`` of an operator config file."""
    operators = []
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, ops = line.strip().split(";")[:3]
            operators += [f"{domain}:{op} (opset {opset})" for op in ops.split(",") if op]
    return sorted(operators)


def _model_bytes(artifact: ModelArtifact) -> int:
    source = read_model(artifact.model_path)
    return file_size(source.model_file) + sum(file_size(f) for f in source.extra_files)


def _samples(signature: Signature, data) -> dict[str, np.ndarray]:
    if data is None:
        from leanserve.runtime import example_inputs

        return example_inputs(signature)
    return {n: data[n][:64] for n in signature.input_names}


# --- registering ------------------------------------------------------------------------------------

def write_report(report: EdgeReport, folder: Path) -> list[Path]:
    """Write the report as Markdown and JSON into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_MD).write_text(report.to_markdown(), encoding="utf-8")
    (folder / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    return [folder / REPORT_MD, folder / REPORT_JSON]


def _provenance(source: str, variant: _Int8) -> Provenance:
    return Provenance(source=f"leanserve edge {source} --target ort", parent=source,
                      recipe={"name": variant.recipe, "target": "ort", "kept_float": list(variant.kept_float),
                              "converter": "onnxruntime.tools.convert_onnx_models_to_ort (fixed optimizations)"})


def _metrics(report: EdgeReport) -> dict[str, Any]:
    metrics: dict[str, Any] = {"edge_target": report.target, "edge_profile": report.profile.name,
                               "size_ratio_vs_fp32": round(report.size_ratio, 4),
                               "device_peak_rss_mb": report.device.peak_rss_mb,
                               "device_latency_p50_ms": report.device.latency_p50_ms,
                               "device_latency_p99_ms": report.device.latency_p99_ms}
    if report.accuracy:
        metrics[report.accuracy.metric] = round(report.accuracy.artifact, 6)
        metrics[f"{report.accuracy.metric}_drop"] = round(report.accuracy.drop, 6)
    return metrics


# --- ExecuTorch -------------------------------------------------------------------------------------

def executorch_missing(artifact: ModelArtifact) -> str:
    """Why ``--target executorch`` cannot be built here, and what to do about it."""
    needs_source = artifact.manifest.format != "torch_export"
    if importlib.util.find_spec("executorch") is None:
        why = (f"--target executorch needs ExecuTorch, which is not installed here: install {EXECUTORCH_PIN} with "
               "torch pinned by a constraint (echo torch==2.13.0 > c.txt; pip install "
               f"{EXECUTORCH_PIN} -c c.txt)")
    else:
        why = "--target executorch (a .pte with the XNNPACK delegate) is not built by this leanserve yet"
    if needs_source:
        why += (f"; it also needs a version with a PyTorch source (a torch.export .pt2), and "
                f"{artifact.path.parent.name}:{artifact.path.name} is {artifact.manifest.format}")
    return why + "; use --target ort meanwhile"
