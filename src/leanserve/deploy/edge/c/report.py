"""The device report of a C artifact: quality on the held-out rows, agreement with ONNX Runtime, the scratch
arena, and flash/RAM/instructions on the Cortex-M against the profile's limits (Markdown and JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leanserve.deploy.edge.c.cortex_m import Footprint, McuProfile
from leanserve.deploy.edge.c.verify import Agreement
from leanserve.deploy.edge.report import REPORT_JSON, REPORT_MD
from leanserve.measure import cpu_description


@dataclass(frozen=True)
class Quality:
    """One data part's quality (``metric``) of the fp32 original, the C int8 code and ONNX Runtime's int8."""

    part: str  # "selection" (chose the variant) or "held-out" (never seen by the choice)
    rows: int
    metric: str
    fp32: float
    c_int8: float
    ort_int8: float
    drop: float
    allowed_drop: float

    @property
    def within_budget(self) -> bool:
        return self.drop <= self.allowed_drop + 1e-12


@dataclass(frozen=True)
class QemuCheck:
    """The Cortex-M4 run on QEMU next to the host run of the same rows."""

    board: str
    rows: int
    top1_agreement: float
    max_abs_diff: float
    instructions_per_inference: int | None


@dataclass(frozen=True)
class CReport:
    """Everything the C artifact's report says; ``to_dict`` is the JSON, ``to_markdown`` the Markdown."""

    source: str
    recipe: str
    profile: McuProfile
    operators: tuple[str, ...]
    layers: tuple[str, ...]
    macs: int
    weight_bytes: int
    original_bytes: int
    scratch_bytes: int
    scratch_live_peak_bytes: int
    scratch_unshared_bytes: int
    split: str
    selection: Quality | None
    holdout: Quality | None
    agreement: Agreement | None
    footprint: Footprint | None
    qemu: QemuCheck | None
    notes: tuple[str, ...] = ()
    target: str = "c"
    host: dict[str, Any] = field(default_factory=cpu_description)

    @property
    def artifact_bytes(self) -> int:
        """Flash of the compiled model (model + kernels, text + rodata), or its weights when not cross-compiled."""
        return self.footprint.model_text_bytes if self.footprint else self.weight_bytes

    @property
    def size_ratio(self) -> float:
        return self.artifact_bytes / self.original_bytes

    @property
    def fits(self) -> bool | None:
        """Whether flash and RAM fit the profile; None when the cross toolchain was absent."""
        if self.footprint is None:
            return None
        return (self.footprint.flash_bytes <= self.profile.flash_bytes
                and self.footprint.ram_bytes <= self.profile.ram_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.footprint:
            data["footprint"].update(flash_bytes=self.footprint.flash_bytes, ram_bytes=self.footprint.ram_bytes)
        return {**data, "artifact_bytes": self.artifact_bytes, "size_ratio": round(self.size_ratio, 4),
                "fits": self.fits, "format": "c_source"}

    def to_markdown(self) -> str:
        lines = [f"# C99 source for microcontrollers: {self.source}", "",
                 "This version is **source code**, compiled into a device's firmware; leanserve does not serve it.", "",
                 f"- model: {self.recipe}; {len(self.layers)} layers, {self.macs:,} multiply-accumulates per inference",
                 f"- weights: {self.weight_bytes:,} bytes (int8 weights, int32 biases and multipliers); fp32 original "
                 f"{self.original_bytes:,} bytes",
                 f"- scratch arena: {self.scratch_bytes:,} bytes, planned by buffer lifetimes (peak of live buffers "
                 f"{self.scratch_live_peak_bytes:,}; {self.scratch_unshared_bytes:,} without sharing)",
                 "", f"## Quality ({self.split})", ""]
        lines += [_quality_line(q) for q in (self.selection, self.holdout) if q is not None] or \
            ["- **not checked** (no evaluation data given; pass --eval DATA)"]
        if self.agreement:
            a = self.agreement
            lines.append(f"- C int8 vs ONNX Runtime int8 (same QDQ model, held-out rows): same top-1 on "
                         f"{a.top1_agreement:.2%} of {a.rows} rows; largest output difference {a.max_abs_diff:.4g} "
                         f"= {a.max_diff_steps:g} quantization step(s)")
        lines += ["", f"## On the {self.profile.describe()} profile", ""]
        if self.footprint is None:
            lines.append("- **not cross-compiled**: arm-none-eabi-gcc and qemu-system-arm were not found "
                         "(apt-get install gcc-arm-none-eabi qemu-system-arm)")
        else:
            f, p = self.footprint, self.profile
            lines += [f"- flash: {f.flash_bytes:,} of {p.flash_bytes:,} bytes ({f.flash_bytes / p.flash_bytes:.1%}): "
                      f"text {f.text_bytes:,} + rodata {f.rodata_bytes:,} + data {f.data_bytes:,} "
                      f"(model and kernels alone {f.model_text_bytes:,})",
                      f"- RAM: {f.ram_bytes:,} of {p.ram_bytes:,} bytes ({f.ram_bytes / p.ram_bytes:.1%}): data "
                      f"{f.data_bytes:,} + bss {f.bss_bytes:,} (scratch, input and output buffers) + stack "
                      f"{f.stack_bytes:,} (gcc -fstack-usage)",
                      f"- fits: {'yes' if self.fits else '**NO**'}"]
        if self.qemu:
            q = self.qemu
            count = f"{q.instructions_per_inference:,}" if q.instructions_per_inference else "not counted"
            lines.append(f"- QEMU {q.board} (Cortex-M4): {q.rows} rows, same top-1 as the host build on "
                         f"{q.top1_agreement:.0%}, largest difference {q.max_abs_diff:.3g}; instructions per "
                         f"inference: {count} (-icount)")
        lines.append(f"- host checks ran on: {self.host['model']} ({self.host['cores']} cores)")
        lines += ["", f"## Operators ({', '.join(self.operators)})", "", f"- kernels called: {', '.join(self.layers)}"]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"


def _quality_line(q: Quality) -> str:
    verdict = "within" if q.within_budget else "OUTSIDE"
    return (f"- {q.part} rows ({q.rows}), {q.metric}: fp32 {q.fp32:.4f}, C int8 {q.c_int8:.4f}, ONNX Runtime int8 "
            f"{q.ort_int8:.4f} (drop {q.drop:+.4f}, {verdict} the allowed {q.allowed_drop:.4f})")


def write_report(report: CReport, folder: Path) -> list[Path]:
    """Write the report as Markdown and JSON into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_MD).write_text(report.to_markdown(), encoding="utf-8")
    (folder / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return [folder / REPORT_MD, folder / REPORT_JSON]
