"""ExecuTorch programs (.pte) of a version's torch.export program, lowered to the XNNPACK delegate.

The program is exported again at one row (a device runs one request at a time, and ExecuTorch plans all
memory ahead for fixed shapes), quantized to int8 with PyTorch's PT2E flow and the XNNPACK quantizer
when that stays within the accuracy budget, lowered with ``to_edge_transform_and_lower`` and written
with a signature file beside it (``model.pte.json``), since a .pte keeps no tensor names.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import ModelArtifact, Signature, TensorSpec
from leanserve.deploy.edge.report import Accuracy
from leanserve.errors import UnsupportedFormat
from leanserve.formats import pte_sidecar

log = logging.getLogger(__name__)

MODEL_FILE = "model.pte"
CALIBRATION_ROWS = 256
INSTALL_HINT = "pip install 'leanserve[edge]' (ExecuTorch; keep torch at its pinned version with -c or the Makefile)"


@dataclass(frozen=True)
class Recipe:
    """One way to build the program: float, or int8 with static (calibrated) or dynamic activations."""

    name: str
    int8: bool
    dynamic: bool = False


FP32 = Recipe("fp32 (XNNPACK)", int8=False)
STATIC_INT8 = Recipe("static int8 (PT2E, XNNPACK quantizer, per-channel weights)", int8=True)
DYNAMIC_INT8 = Recipe("dynamic int8 (PT2E, XNNPACK quantizer, per-channel weights)", int8=True, dynamic=True)


@dataclass(frozen=True)
class Program:
    """A written .pte with its signature file, what was lowered to XNNPACK, and its accuracy if checked."""

    path: Path
    sidecar: Path
    recipe: Recipe
    operators: tuple[str, ...]
    accuracy: Accuracy | None = None
    notes: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()  # what was done another way than planned, and why (kept in the manifest)


def require_executorch(artifact: ModelArtifact) -> None:
    """UnsupportedFormat, saying what to do, unless ExecuTorch is installed and the version keeps a
    torch.export program."""
    from leanserve.torch_source import has_program

    source = f"{artifact.path.parent.name}:{artifact.path.name}"
    if importlib.util.find_spec("executorch") is None:
        raise UnsupportedFormat(f"--target executorch needs ExecuTorch, which is not installed here: {INSTALL_HINT}; "
                                "or use --target ort")
    if not has_program(artifact):
        raise UnsupportedFormat(
            f"--target executorch lowers the model's PyTorch program, and {source} ({artifact.manifest.format}) has "
            "none: register the model with `leanserve export FILE.py:FUNC --name NAME` or `leanserve demo` (both keep "
            "a torch.export program), or import a .pt2 file; or use --target ort for this version")


def choose_program(artifact: ModelArtifact, work: Path, *, data: Mapping[str, np.ndarray] | None,
                   calib: Mapping[str, np.ndarray] | None, check: Callable[[Path], Accuracy]) -> Program:
    """The smallest program within the accuracy budget: static int8, then dynamic int8, else fp32 (said so in
    its notes). ``check`` measures a written program against the original on ``data``; without ``data``
    int8 is used unchecked (static when ``calib`` is given, else dynamic). Raises UnsupportedFormat when
    ExecuTorch cannot export or lower the program."""
    from leanserve.torch_source import load_program

    module = load_program(artifact).module()
    example = _example(artifact.signature, data if data is not None else calib)
    calibration = calib if calib is not None else data
    if data is None:
        recipe = STATIC_INT8 if calibration is not None else DYNAMIC_INT8
        program = build(module, example, artifact.signature, recipe, work / "unchecked", calibration)
        return _with_notes(program, "accuracy was not checked: int8 was applied without evaluation data (pass --eval DATA)")
    tried = []
    for recipe in (STATIC_INT8, DYNAMIC_INT8):
        program = build(module, example, artifact.signature, recipe, work / f"int8-{len(tried)}", calibration)
        accuracy = check(program.path)
        tried.append(f"{recipe.name}: drop {accuracy.drop:+.4f}")
        if accuracy.within_budget:
            return _with_notes(program, *(f"tried first, outside the budget: {t}" for t in tried[:-1]), accuracy=accuracy)
    program = build(module, example, artifact.signature, FP32, work / "fp32", None)
    return _with_notes(program, f"no int8 program stayed within the budget ({'; '.join(tried)}); the artifact is fp32",
                       accuracy=check(program.path))


def build(module, example: tuple, signature: Signature, recipe: Recipe, folder: Path,
          calibration: Mapping[str, np.ndarray] | None) -> Program:
    """Export ``module`` at ``example``'s one-row shapes, quantize it as ``recipe`` says (calibrating on
    ``calibration``), lower it to XNNPACK and write ``folder/model.pte`` with its signature file."""
    import torch

    from leanserve.runtime.executorch import quiet_torchao

    with quiet_torchao():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.devtools.backend_debug import get_delegation_info
        from executorch.exir import to_edge_transform_and_lower

    folder.mkdir(parents=True, exist_ok=True)
    fallbacks: tuple[str, ...] = ()
    try:
        if recipe.int8:
            module, fallbacks = _quantize(module, example, signature, recipe, calibration)
        edge = to_edge_transform_and_lower(torch.export.export(module, example), partitioner=[XnnpackPartitioner()])
        operators = _operators(get_delegation_info(edge.exported_program().graph_module))
        buffer = edge.to_executorch().buffer
    except Exception as exc:  # export and lowering raise many types (UserError, Unsupported, AssertionError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedFormat(
            f"ExecuTorch cannot lower this model ({recipe.name}): {reason}; the model must export with torch.export "
            "at one row and use operators ExecuTorch has kernels for; use --target ort meanwhile") from exc
    path = folder / MODEL_FILE
    path.write_bytes(buffer)
    sidecar = pte_sidecar(path)
    sidecar.write_text(json.dumps({"signature": _one_row_signature(signature, example).to_dict()}, indent=2),
                       encoding="utf-8")
    return Program(path, sidecar, recipe, operators, notes=fallbacks, fallbacks=fallbacks)


def _quantize(module, example: tuple, signature: Signature, recipe: Recipe, calibration) -> tuple:
    """PT2E int8: the XNNPACK quantizer's annotations, observers run over the calibration rows (static), then
    converted to quantize/dequantize pairs that the XNNPACK partitioner turns into int8 kernels. Returns
    (converted module, fallbacks taken)."""
    import torch

    from leanserve.runtime.executorch import quiet_torchao

    with quiet_torchao():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=recipe.dynamic)
    quantizer = XNNPACKQuantizer().set_global(config)
    if recipe.dynamic or calibration is None:
        prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
        prepared(*example)
        return convert_pt2e(prepared), ()
    rows = [np.ascontiguousarray(np.asarray(calibration[n])[:CALIBRATION_ROWS]) for n in signature.input_names]
    graph, step, fallbacks = _calibration_graph(module, example, rows)
    prepared = prepare_pt2e(graph, quantizer)
    for start in range(0, len(rows[0]), step):
        prepared(*(torch.from_numpy(r[start:start + step]) for r in rows))
    return convert_pt2e(prepared), fallbacks


def _calibration_graph(module, example: tuple, rows: list[np.ndarray]) -> tuple:
    """(graph to calibrate, rows to feed it at once, fallbacks): exported with a dynamic batch axis when the
    model allows it (observers cost per call, so 64 rows a call), else at one row, with a warning."""
    import torch

    if len(rows[0]) < 2:
        return torch.export.export(module, example).module(), 1, ()
    batch = torch.export.Dim("batch", max=CALIBRATION_ROWS)
    try:
        two = tuple(torch.from_numpy(r[:2]) for r in rows)
        return torch.export.export(module, two, dynamic_shapes=tuple({0: batch} for _ in rows)).module(), 64, ()
    except RuntimeError as exc:  # UserError "Constraints violated (batch)", or a shape error: the batch axis is fixed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.warning("calibrating row by row: the model cannot be exported with a dynamic batch axis (%s)", reason)
    fallback = f"int8 calibration ran row by row (a dynamic batch export failed: {reason})"
    return torch.export.export(module, example).module(), 1, (fallback,)


def _example(signature: Signature, data: Mapping[str, np.ndarray] | None) -> tuple:
    """One row per input: the data's first row, else zeros in the signature's shapes."""
    import torch

    from leanserve.runtime import example_inputs

    rows = {n: np.asarray(data[n])[:1] for n in signature.input_names} if data is not None else example_inputs(signature)
    return tuple(torch.from_numpy(np.ascontiguousarray(rows[n])) for n in signature.input_names)


def _one_row_signature(signature: Signature, example: tuple) -> Signature:
    """The version's signature with the program's fixed input sizes, the first axis left open where it was
    (the engine runs such requests row by row)."""
    inputs = tuple(
        TensorSpec(spec.name, spec.datatype,
                   tuple(-1 if axis == 0 and spec.shape[0] == -1 else int(d) for axis, d in enumerate(tensor.shape)))
        for spec, tensor in zip(signature.inputs, example))
    return Signature(inputs, signature.outputs)


def _operators(info) -> tuple[str, ...]:
    """``op: N delegated, M portable`` for each operator type in the lowered graph."""
    rows = []
    for op, counts in sorted(info.delegation_by_operator.items()):
        if op == "getitem":  # tuple indexing of the delegate's outputs, not an operator
            continue
        parts = [f"{counts.delegated} delegated"] if counts.delegated else []
        parts += [f"{counts.non_delegated} portable"] if counts.non_delegated else []
        rows.append(f"{op}: {', '.join(parts)}")
    return tuple(rows)


def _with_notes(program: Program, *notes: str, accuracy: Accuracy | None = None) -> Program:
    return Program(program.path, program.sidecar, program.recipe, program.operators, accuracy,
                   program.notes + tuple(notes), program.fallbacks)
