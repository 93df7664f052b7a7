"""``leanserve edge MODEL --target c``: choose a static int8 model within the accuracy budget, lower it to C99,
check it on this machine and on an emulated Cortex-M4, and register the sources as a new version.

The evaluation data is split (seeded) into a selection part, on which the calibration method is chosen,
and a held-out part, on which the report's quality figures are measured; calibration uses ``--calib``
data when given, else the selection rows, never the held-out ones.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import ModelArtifact, Provenance
from leanserve.deploy.edge.c.arena import plan_arena
from leanserve.deploy.edge.c.codegen import MODEL_FILE, SOURCE_FILES, Sources, write_sources
from leanserve.deploy.edge.c.cortex_m import BOARD, MCU_PROFILES, McuProfile, check_on_cortex_m, missing_tools
from leanserve.deploy.edge.c.lower import lower
from leanserve.deploy.edge.c.program import Program
from leanserve.deploy.edge.c.report import CReport, QemuCheck, Quality, write_report
from leanserve.deploy.edge.c.verify import HostModel, agreement, compile_host, ort_outputs
from leanserve.deploy.edge.pipeline import refuse_pipeline
from leanserve.derived import HeldOut, check_not_worse
from leanserve.errors import InvalidInput, LeanserveError, UnsupportedFormat
from leanserve.repository import Repository, VersionRef

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_int8.onnx"  # the QDQ model the C code was generated from and checked against
SIDECAR_SUFFIX = ".json"  # model.c.json: signature, API and files of the C sources
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")  # tried in this order; the first within budget is kept
QEMU_ROWS = 5


@dataclass(frozen=True)
class COutcome:
    """The version registered, its report and the report files inside it."""

    ref: VersionRef
    report: CReport
    files: tuple[Path, ...]


class DoesNotFitMcu(LeanserveError):
    """The C artifact does not fit the profile or stays outside the budget; ``report`` says what was measured."""

    def __init__(self, message: str, report: CReport) -> None:
        super().__init__(message)
        self.report = report


def mcu_profile(name: str | None) -> McuProfile:
    """The named microcontroller profile (default cortex-m4); InvalidInput for unknown names."""
    name = name or "cortex-m4"
    if name not in MCU_PROFILES:
        raise InvalidInput(f"unknown microcontroller profile {name!r} for --target c; choose one of {', '.join(MCU_PROFILES)}")
    return MCU_PROFILES[name]


@dataclass(frozen=True)
class _Candidate:
    method: str
    qdq: Path
    program: Program
    sources: Sources
    host: HostModel
    notes: tuple[str, ...]


def build_c_edge(repo: Repository, name: str, version: int | str | None = None, *, profile: McuProfile | None = None,
                 eval_path: str | Path | None = None, calib_path: str | Path | None = None,
                 holdout_path: str | Path | None = None, max_drop: str = "1%",
                 report_dir: str | Path | None = None, force: bool = False) -> COutcome:
    """Build, check and register the C artifact of ``name:version`` (an ONNX version).

    Raises InvalidInput (bad data, no data to calibrate on), UnsupportedFormat (not ONNX, no host compiler,
    an operator the C kernels lack: named, with the supported list), DoesNotFitMcu (no int8 model within
    the budget, or flash/RAM over the profile), WorseThanParent (the held-out accuracy drops by more than
    the budget, unless ``force``: then it is registered with a warning); nothing is registered when it raises.
    """
    from leanserve.optimize.run import evaluation_split, load_data
    from leanserve.optimize.search import parse_budget

    profile = profile or mcu_profile(None)
    artifact = repo.get(name, version)
    source = f"{name}:{artifact.path.name}"
    refuse_pipeline(artifact, "c")
    if artifact.manifest.format != "onnx":
        raise UnsupportedFormat(f"--target c lowers ONNX versions; {source} is {artifact.manifest.format} "
                                "(give an ONNX version, or export the model with leanserve export first)")
    signature = artifact.signature
    if len(signature.inputs) != 1:
        raise UnsupportedFormat(f"--target c takes models with one input; {source} has {len(signature.inputs)}")
    input_name = signature.input_names[0]
    split = evaluation_split(signature, eval_path, holdout_path) if eval_path else None
    if calib_path:
        calibration = load_data(calib_path, signature, "calibration")[input_name]
    elif split is not None:
        calibration = split.selection[input_name]
    else:
        raise InvalidInput("--target c needs data for static int8: --eval DATA.npz (checked within the budget) "
                           "or at least --calib DATA.npz (unchecked)")
    budget = parse_budget(max_drop)
    with tempfile.TemporaryDirectory(prefix="leanserve-edge-c-") as tmp:
        work = Path(tmp)
        chosen, selection, tried = _choose(artifact, split, calibration, budget, work)
        notes = list(chosen.notes)
        if split is None:
            notes.append("accuracy was not checked: static int8 was calibrated without evaluation data (pass --eval DATA)")
        elif tried:
            notes.append("calibration methods tried first, outside the budget: " + "; ".join(tried))
        holdout, agree = _holdout_figures(artifact, chosen, split, budget) if split else (None, None)
        rows = (split.holdout[input_name] if split else calibration)[:QEMU_ROWS]
        footprint, qemu = _on_cortex_m(chosen, rows, notes)
        arena = chosen.sources.arena
        report = CReport(
            source=source, recipe=f"static int8 QDQ ({chosen.method} calibration), per-channel int8 weights, "
                                  "int8 activations", profile=profile, operators=chosen.program.ops,
            layers=tuple(layer.kind for layer in chosen.program.layers), macs=chosen.program.macs,
            weight_bytes=chosen.program.weight_bytes, original_bytes=artifact.model_path.stat().st_size,
            scratch_bytes=arena.size_bytes, scratch_live_peak_bytes=arena.live_peak_bytes,
            scratch_unshared_bytes=arena.unshared_bytes,
            split=split.info.describe() if split else "no evaluation data", selection=selection, holdout=holdout,
            agreement=agree, footprint=footprint, qemu=qemu, notes=tuple(notes))
        files = write_report(report, work / "report")
        if report_dir:
            write_report(report, Path(report_dir))
        if selection is not None and not selection.within_budget:
            raise DoesNotFitMcu(f"no static int8 model of {source} stayed within --max-accuracy-drop {max_drop} on the "
                                f"selection rows ({'; '.join(tried)}); nothing was registered", report)
        if report.fits is False:
            raise DoesNotFitMcu(f"{source} as C does not fit the {profile.describe()} profile (flash "
                                f"{footprint.flash_bytes:,} bytes, RAM {footprint.ram_bytes:,} bytes); nothing was "
                                "registered", report)
        forced = check_not_worse(_held_out_figure(holdout), force, f"the C artifact of {source}")
        folder = _artifact_folder(chosen, signature, work / "artifact")
        metrics = _metrics(report) | ({"registered_with_force": forced} if forced else {})
        ref = repo.add(folder / MODEL_FILE, name, serve=False,  # C sources cannot be served
                       provenance=_provenance(source, chosen), metrics=metrics,
                       attachments=[chosen.qdq, *files], check_load=False)
        stored = repo.get(ref.name, ref.version, verify=False).path
    return COutcome(ref, report, tuple(stored / f.name for f in files))


def _choose(artifact: ModelArtifact, split, calibration: np.ndarray, budget, work: Path):
    """The first calibration method whose C build is within the budget on the selection rows (the last one
    tried when none is, so the report can say how far off it was), with its selection figures and what
    was tried before it."""
    tried: list[str] = []
    candidate = selection = None
    for method in CALIBRATION_METHODS if split is not None else CALIBRATION_METHODS[:1]:
        candidate = _candidate(artifact, method, calibration, work / method)
        if split is None:
            return candidate, None, tried
        selection = _quality("selection", artifact, candidate, split.selection, budget)
        if selection.within_budget:
            return candidate, selection, tried
        tried.append(f"{method}: drop {selection.drop:+.4f}")
    return candidate, selection, tried


def _candidate(artifact: ModelArtifact, method: str, calibration: np.ndarray, work: Path) -> _Candidate:
    from leanserve.optimize.quantize import STATIC_OP_TYPES, static_int8
    from leanserve.optimize.steps import PassContext

    work.mkdir(parents=True)
    qdq = work / REFERENCE_FILE
    context = PassContext(artifact.signature, {artifact.signature.input_names[0]: calibration},
                          exclude_nodes=_bias_adds(artifact.model_path))
    result = static_int8(artifact.model_path, qdq, context, method=method, op_types=(*STATIC_OP_TYPES, "Add"),
                         seven_bit_weights=False)
    program = lower(qdq)  # UnsupportedOperator here is the model's, whatever the calibration: it propagates
    arena = plan_arena(program)
    sources = write_sources(program, arena, work / "c", artifact.path.parent.name)
    library = compile_host(sources.folder, work / "libmodel.so")
    host = HostModel(library, sources.input_size, sources.output_size, arena.size_bytes)
    return _Candidate(method, qdq, program, sources, host, tuple(n for n in result.notes if n))


def _bias_adds(model_path: Path) -> tuple[str, ...]:
    """The Add nodes with a constant operand (a MatMul's bias, which the lowering folds into the MatMul):
    left in float, while an Add of two computed tensors (a residual) is quantized, since the C code has
    no float arithmetic to run it in."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return tuple(n.name for n in graph.node if n.op_type == "Add" and n.name and any(i in constants for i in n.input))


def _fp32_outputs(artifact: ModelArtifact, rows: np.ndarray) -> np.ndarray:
    from leanserve.runtime import load_session

    session = load_session(artifact)
    try:
        return next(iter(session.run({artifact.signature.input_names[0]: rows}).values()))
    finally:
        session.close()


def _quality(part: str, artifact: ModelArtifact, candidate: _Candidate, data: dict, budget) -> Quality:
    from leanserve.measure import METRICS, choose_metric, quality_drop

    rows = data[artifact.signature.input_names[0]]
    metric = choose_metric(data)
    output = artifact.signature.outputs[0].name
    fp32 = _fp32_outputs(artifact, rows)
    shape = (len(rows), *fp32.shape[1:])
    c_out = candidate.host.predict(rows).reshape(shape)
    ort = ort_outputs(candidate.qdq, rows, artifact.signature.input_names[0]).reshape(shape)
    reference = {output: fp32}
    base = METRICS[metric](reference, data, reference)
    mine = METRICS[metric]({output: c_out}, data, reference)
    theirs = METRICS[metric]({output: ort}, data, reference)
    return Quality(part, len(rows), metric, base, mine, theirs, quality_drop(metric, base, mine), budget.allowed(base))


def _held_out_figure(quality) -> HeldOut | None:
    from leanserve.measure import HIGHER_IS_BETTER

    if quality is None:
        return None
    return HeldOut(quality.metric, quality.fp32, quality.c_int8, quality.allowed_drop,
                   HIGHER_IS_BETTER.get(quality.metric, True))


def _holdout_figures(artifact: ModelArtifact, chosen: _Candidate, split, budget):
    rows = split.holdout[artifact.signature.input_names[0]]
    quality = _quality("held-out", artifact, chosen, split.holdout, budget)
    c_out = chosen.host.predict(rows)
    ort = ort_outputs(chosen.qdq, rows, artifact.signature.input_names[0])
    step = chosen.program.output_qparams.scale if chosen.program.output_qparams else None
    return quality, agreement(c_out, ort, step)


def _on_cortex_m(chosen: _Candidate, rows: np.ndarray, notes: list[str]):
    missing = missing_tools()
    if missing:
        notes.append(f"not cross-compiled for Cortex-M4: {', '.join(missing)} not found "
                     "(apt-get install gcc-arm-none-eabi qemu-system-arm)")
        return None, None
    footprint, run = check_on_cortex_m(chosen.sources.folder, rows, chosen.sources.output_size)
    host = chosen.host.predict(rows)
    same = float((host.argmax(1) == run.outputs.argmax(1)).mean())
    return footprint, QemuCheck(BOARD, len(rows), same, float(np.abs(host - run.outputs).max()), run.instructions)


def _artifact_folder(chosen: _Candidate, signature, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in SOURCE_FILES:
        (folder / name).write_bytes((chosen.sources.folder / name).read_bytes())
    program = chosen.program
    sidecar = {
        "kind": "c_source",
        "about": "C99 source code for microcontrollers, compiled into firmware; not served by leanserve",
        "signature": signature.to_dict(),
        "files": [name for name in SOURCE_FILES if name != MODEL_FILE],
        "api": {"predict": "int leanserve_predict(const float *input, float *output, void *scratch)",
                "predict_int8": "int leanserve_predict_int8(const int8_t *input, float *output, void *scratch)",
                "info": "const leanserve_model_info_t *leanserve_model_info(void)",
                "input_size": chosen.sources.input_size, "output_size": chosen.sources.output_size,
                "scratch_bytes": chosen.sources.arena.size_bytes, "input_scale": program.input_qparams.scale,
                "input_zero_point": program.input_qparams.zero_point},
    }
    (folder / (MODEL_FILE + SIDECAR_SUFFIX)).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    return folder


def _provenance(source: str, chosen: _Candidate) -> Provenance:
    return Provenance(source=f"leanserve edge {source} --target c", parent=source,
                      recipe={"name": f"static int8 ({chosen.method})", "target": "c",
                              "converter": "leanserve.deploy.edge.c (QDQ ONNX lowered to C99)"})


def _metrics(report: CReport) -> dict:
    metrics: dict = {"edge_target": "c", "edge_profile": report.profile.name, "scratch_bytes": report.scratch_bytes,
                     "size_ratio_vs_fp32": round(report.size_ratio, 4)}
    if report.footprint:
        metrics.update(flash_bytes=report.footprint.flash_bytes, ram_bytes=report.footprint.ram_bytes)
    if report.qemu and report.qemu.instructions_per_inference:
        metrics["instructions_per_inference"] = report.qemu.instructions_per_inference
    if report.holdout:
        metrics[f"holdout_{report.holdout.metric}"] = round(report.holdout.c_int8, 6)
        metrics[f"holdout_{report.holdout.metric}_drop"] = round(report.holdout.drop, 6)
    if report.agreement:
        metrics["ort_int8_top1_agreement"] = round(report.agreement.top1_agreement, 6)
    return metrics
