"""ONNX Runtime's ORT format for ``edge --target ort``: an ONNX file converted with ONNX Runtime's own
converter (``convert_to_ort``), and the operator list a reduced-size ONNX Runtime build needs, read from
the config file the converter writes beside it (``read_operators``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from leanserve.errors import ModelLoadError

MODEL_FILE = "model.ort"
OPERATORS_FILE = "model.required_operators.config"  # the name ONNX Runtime's converter gives it


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
