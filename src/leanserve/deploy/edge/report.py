"""The device report of an edge artifact: what was built, how accurate it is next to the original, and
what a run under the device profile measured; written as Markdown and JSON into the new version."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact
from leanserve.deploy.edge.device import DeviceProfile, DeviceRun
from leanserve.measure import METRICS, choose_metric, cpu_description, quality_drop, run_all

REPORT_MD = "edge-report.md"
REPORT_JSON = "edge-report.json"
# what each target's operator list is for
OPERATORS_NOTE = {
    "ort": "model.required_operators.config configures a reduced-size ONNX Runtime build with exactly these",
    "executorch": "delegated: run by XNNPACK inside the program; portable: ExecuTorch kernels the runtime must link",
}
# the report names the converter's version: module holding __version__, and the JSON key
_RUNTIME_VERSION = {"ort": ("onnxruntime", "onnxruntime_version"), "executorch": ("executorch.version", "executorch_version")}


@dataclass(frozen=True)
class Accuracy:
    """The artifact's quality next to the original's on the same evaluation data."""

    metric: str
    original: float
    artifact: float
    drop: float
    allowed_drop: float

    @property
    def within_budget(self) -> bool:
        return self.drop <= self.allowed_drop + 1e-12


@dataclass(frozen=True)
class EdgeReport:
    """Everything the device report says; ``to_dict`` is the JSON, ``to_markdown`` the Markdown."""

    source: str
    target: str
    artifact_file: str
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
        module, key = _RUNTIME_VERSION[self.target]
        return {**asdict(self), "size_ratio": round(self.size_ratio, 4), "accuracy_checked": self.accuracy is not None,
                key: importlib.import_module(module).__version__}

    def to_markdown(self) -> str:
        lines = [f"# Edge artifact: {self.source} for {self.target}", "",
                 f"- artifact: {self.artifact_file} ({self.recipe}{', int8' if self.int8 else ', fp32'})",
                 f"- size: {self.artifact_bytes:,} bytes, {self.size_ratio:.1%} of the fp32 original "
                 f"({self.original_bytes:,} bytes)", _accuracy_line(self.accuracy)]
        if self.kept_float:
            lines.append(f"- kept in float for accuracy: {', '.join(self.kept_float)}")
        lines += ["", f"## Under the {self.profile.describe()} profile", "", *_device_lines(self.device, self.profile, self.target)]
        lines.append(f"- measured on this machine: {self.host['model']} ({self.host['cores']} cores; "
                     f"{', '.join(self.host['flags']) or 'no AVX2/VNNI'}), not on the device itself")
        lines += ["", f"## Operators ({len(self.operators)}; {OPERATORS_NOTE[self.target]})", "",
                  *(f"- {op}" for op in self.operators)]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"


def _accuracy_line(acc: Accuracy | None) -> str:
    if acc is None:
        return "- accuracy: **not checked** (no evaluation data given; pass --eval DATA to check it)"
    verdict = "within" if acc.within_budget else "OUTSIDE"
    return (f"- accuracy ({acc.metric}): {acc.artifact:.4f} vs {acc.original:.4f} for the original "
            f"(drop {acc.drop:+.4f}, {verdict} the allowed {acc.allowed_drop:.4f})")


def _device_lines(run: DeviceRun, profile: DeviceProfile, target: str) -> list[str]:
    if not run.fits:
        return [f"- **did not run within the profile's {profile.memory_mb} MB memory cap "
                f"({profile.threads} thread(s))**: {run.error}"]
    if target == "executorch":  # the cap is on the program's share (device.py says why)
        memory = (f"- peak memory of the program: {run.peak_rss_mb - run.runtime_rss_mb:.1f} MB of {profile.memory_mb} MB "
                  f"({run.peak_rss_mb:.1f} MB resident in all, {run.runtime_rss_mb:.1f} MB of it ExecuTorch's Python "
                  "runtime and libtorch before the program loads)")
    else:
        memory = (f"- peak memory (resident, of the child process): {run.peak_rss_mb:.1f} MB of {profile.memory_mb} MB "
                  f"({run.runtime_rss_mb:.1f} MB before the model loads)")
    return [memory, f"- latency at batch 1: p50 {run.latency_p50_ms:.3f} ms, p99 {run.latency_p99_ms:.3f} ms "
                    f"({run.runs} runs, {profile.threads} intra-op thread(s)); load {run.load_ms:.1f} ms"]


def measure_accuracy(artifact: ModelArtifact, built: Path, data, max_drop: str, *, original: Path | None = None,
                     load: Callable[[Path], Any] | None = None) -> Accuracy:
    """The original's and the built file's quality on the evaluation data (rows of the version's inputs).

    ``original`` is the model file the artifact was built from (default: the version's own); ``load``
    makes a session of a file that answers as the user reads it (default: ``runtime.load_file``, each
    format run by leanserve's engine for it; a pipeline version's puts the file inside its stages).
    """
    from leanserve.optimize.search import parse_budget

    metric = choose_metric(data)
    inputs = {n: data[n] for n in artifact.signature.input_names}
    reference = _outputs(original or artifact.model_path, inputs, load)
    converted = _outputs(built, inputs, load)
    base = METRICS[metric](reference, data, reference)
    mine = METRICS[metric](converted, data, reference)
    return Accuracy(metric, base, mine, quality_drop(metric, base, mine), parse_budget(max_drop).allowed(base))


def _outputs(path: Path, inputs, load=None) -> dict[str, np.ndarray]:
    from leanserve.runtime import load_file

    session = (load or load_file)(path)
    try:
        return run_all(session, inputs)
    finally:
        session.close()


def write_report(report: EdgeReport, folder: Path) -> list[Path]:
    """Write the report as Markdown and JSON into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_MD).write_text(report.to_markdown(), encoding="utf-8")
    (folder / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    return [folder / REPORT_MD, folder / REPORT_JSON]
