"""Import from PyTorch: export an ``nn.Module`` to ONNX and prove the export matches PyTorch numerically."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.errors import ExportError, InvalidInput

log = logging.getLogger(__name__)

# input name -> dynamic axes (a list of axis numbers, or {axis: dim name} as torch.onnx takes it)
DynamicAxes = Mapping[str, Sequence[int] | Mapping[int, str]]


@dataclass(frozen=True)
class ExportResult:
    """An ONNX file written from a PyTorch module, which exporter wrote it, and how close it is."""

    path: Path
    exporter: str  # "dynamo" (torch.export-based) or "torchscript"
    max_abs_diff: float
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def export(
    module,
    example_inputs,
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
    opset: int = 18,
    tolerance: float = 1e-4,
    force: bool = False,
    exporter: str = "auto",
    output_axes: DynamicAxes | None = None,
) -> ExportResult:
    """Export ``module`` to ONNX at ``path`` and check it against PyTorch on ``example_inputs``.

    ``example_inputs`` is a tensor or a tuple of tensors. Every input's first (batch) axis is dynamic;
    ``dynamic_axes`` adds more (e.g. ``{"input_ids": [1]}``); pass ``{}`` for a fully static model.
    ``output_axes`` names the dynamic axes of outputs beyond the batch (e.g. a sequence axis). The
    torch.export-based exporter is tried first, then the TorchScript-based one (``exporter="dynamo"`` or ``"torchscript"`` picks one;
    the TorchScript exporter's attention pattern is the one ONNX Runtime's transformer fusions recognise).
    Raises ExportError if the exporters fail, or if the largest absolute difference from PyTorch exceeds
    ``tolerance`` (unless ``force``; the file is then kept).
    """
    import torch

    path = Path(path)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise InvalidInput("example_inputs must be a torch.Tensor or a tuple of them")
    input_names = tuple(input_names or _forward_arg_names(module, len(args)))
    if len(input_names) != len(args):
        raise InvalidInput(f"{len(input_names)} input names given for {len(args)} example inputs")
    module = module.eval()
    with torch.no_grad():
        expected = _as_tuple(module(*args))
    output_names = tuple(output_names or (["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]))
    if len(output_names) != len(expected):
        raise InvalidInput(f"{len(output_names)} output names given but the module returns {len(expected)} outputs")
    axes = _with_batch_axis(input_names, dynamic_axes)
    unknown = [n for n in axes if n not in input_names]
    if unknown:
        raise InvalidInput(f"dynamic_axes names unknown input {unknown[0]!r}; inputs are {list(input_names)}")
    exporters = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    if exporter not in ("auto", *exporters):
        raise InvalidInput(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    attempts = list(exporters.items()) if exporter == "auto" else [(exporter, exporters[exporter])]

    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    chosen = None
    for name, attempt in attempts:
        try:
            attempt(module, args, path, input_names, output_names, axes, opset, dict(output_axes or {}))
            chosen = name
            break
        except Exception as exc:  # exporters raise many unrelated types; each failure is reported below
            log.info("the %s exporter failed: %s", name, exc)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{name}: {first_line[:300]}")
    if chosen is None:
        raise ExportError("the ONNX export failed; " + "; ".join(errors))
    if errors:
        log.warning("the torch.export-based exporter failed (%s); used the TorchScript-based one", errors[0])

    diff = _max_abs_diff(path, input_names, output_names, args, expected)
    if diff > tolerance and not force:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"the ONNX export differs from PyTorch by up to {diff:.3g} (tolerance {tolerance:g}); "
            "pass force=True (--force) to keep it anyway, or a larger tolerance"
        )
    return ExportResult(path, chosen, diff, input_names, output_names)


def _with_batch_axis(input_names: Sequence[str], dynamic_axes: DynamicAxes | None) -> dict[str, list[int]]:
    """The axes to export dynamic: the batch axis (0) of every input, plus the axes given; ``{}`` means
    a fully static model. Given axes add to the batch axis rather than replace it: ``input_ids:1`` alone
    used to fix the batch at the example's size, which turned batching off."""
    if dynamic_axes is not None and not dynamic_axes:
        return {}
    axes = {name: [0] for name in input_names}
    for name, spec in (dynamic_axes or {}).items():
        axes[name] = sorted({0, *_axes_list(spec)})
    return axes


def _forward_arg_names(module, count: int) -> list[str]:
    params = [
        p.name for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _axes_list(spec: Sequence[int] | Mapping[int, str]) -> list[int]:
    return sorted(int(a) for a in (spec.keys() if isinstance(spec, Mapping) else spec))


def _export_dynamo(module, args, path, input_names, output_names, axes, opset, output_axes=None) -> None:
    # torch.export infers which output dims are dynamic from the inputs' dims: output_axes is not needed
    import onnx
    import torch

    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis in _axes_list(axes[name])} if name in axes else None
        for name in input_names
    )
    with _quiet():
        # Output names are set afterwards: the exporter's own renaming can collide with internal values
        # (MiniLM's word-embedding Gather is also called "embedding"), giving an invalid model.
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=list(input_names),
            dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
        )
    proto = program.model_proto
    _rename_outputs(proto.graph, list(output_names))
    onnx.save(proto, str(path))


def _rename_outputs(graph, names: list[str]) -> None:
    """Give the graph outputs ``names``, first renaming any internal value that already uses one."""
    outputs = [o.name for o in graph.output]
    mapping = {}
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {i.name for i in graph.input}
    for old, new in zip(outputs, names):
        if old == new:
            continue
        if new in taken:
            mapping[new] = f"{new}__internal"
        mapping[old] = new
    if not mapping:
        return
    for node in graph.node:
        node.input[:] = [mapping.get(v, v) for v in node.input]
        node.output[:] = [mapping.get(v, v) for v in node.output]
    for value in (*graph.output, *graph.value_info):
        value.name = mapping.get(value.name, value.name)


def _export_torchscript(module, args, path, input_names, output_names, axes, opset, output_axes=None) -> None:
    import torch

    legacy_axes: dict[str, dict[int, str]] = {
        name: {axis: f"{name}_dim{axis}" for axis in _axes_list(spec)} for name, spec in axes.items()
    }
    batched = any(0 in v for v in legacy_axes.values())
    for out in output_names:  # a dynamic batch in means a dynamic batch out
        extra = _axes_list((output_axes or {}).get(out, []))
        if batched or extra:
            dims = ({0} if batched else set()) | set(extra)
            legacy_axes[out] = {axis: ("batch" if axis == 0 else f"{out}_dim{axis}") for axis in sorted(dims)}
    with _quiet():
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=list(input_names),
            output_names=list(output_names), dynamic_axes=legacy_axes, opset_version=min(opset, 17),
        )


@contextlib.contextmanager
def _quiet():
    # The exporters print progress and deprecation chatter to stdout; keep the user's terminal clean.
    torch_log = logging.getLogger("torch.onnx")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _max_abs_diff(path, input_names, output_names, args, expected) -> float:
    import onnxruntime as ort

    try:
        # As written, fusions off: the ONNX standard's arithmetic, what the export must match. With fusions,
        # a QDQ export (QAT) runs on int8 kernels that saturate on CPUs without VNNI (1.77 off on AVX2).
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {name: arg.detach().cpu().numpy() for name, arg in zip(input_names, args)}
        got = session.run(list(output_names), feed)
    except Exception as exc:  # ORT raises its own pybind types
        raise ExportError(f"the exported ONNX model does not run in ONNX Runtime: {exc}") from exc
    diffs = [
        float(np.max(np.abs(g.astype(np.float64) - e.detach().cpu().numpy().astype(np.float64)))) if g.size else 0.0
        for g, e in zip(got, expected)
    ]
    return max(diffs, default=0.0)


def load_factory(spec: str):
    """Run ``FILE.py:FUNCTION``, a user's function returning ``(module, example_inputs)``, and return that pair.

    The user's own code runs, on the user's request. Raises InvalidInput for a malformed spec, a missing
    file or function, or a function returning something else.
    """
    import importlib.util

    path, _, func = spec.rpartition(":")
    if not path or not func or not path.endswith(".py"):
        raise InvalidInput(f"{spec!r}: expected FILE.py:FUNCTION, a function returning (module, example_inputs)")
    if not Path(path).is_file():
        raise InvalidInput(f"{path}: no such file")
    module_spec = importlib.util.spec_from_file_location("leanserve_user_factory", path)
    user = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(user)
    if not hasattr(user, func):
        raise InvalidInput(f"{path} has no function {func!r}")
    result = getattr(user, func)()
    if not isinstance(result, tuple) or len(result) != 2:
        raise InvalidInput(f"{spec} must return (module, example_inputs)")
    return result


def export_and_register(module, example_inputs, path: str | Path, repo, name: str, *, source: str | None = None,
                        **export_options):
    """Export ``module`` to ONNX at ``path`` (see ``export``, which takes ``export_options``) and import the
    file as the next version of ``name`` in ``repo``, with the module itself attached: TorchScript (for
    learning and explanations) and, where it exports, a torch.export program (for device compilers).

    Returns (ExportResult, VersionRef). Raises what ``export`` and ``Repository.add`` raise.
    """
    import tempfile

    from leanserve.artifact import Provenance
    from leanserve.torch_source import save_program, save_source

    result = export(module, example_inputs, path, **export_options)
    with tempfile.TemporaryDirectory() as tmp:
        sources = [save_source(module, example_inputs, tmp), save_program(module, example_inputs, tmp)]
        ref = repo.add(result.path, name, provenance=Provenance(source=source, exporter=result.exporter),
                       metrics={"export_max_abs_diff": result.max_abs_diff}, attachments=[s for s in sources if s])
    return result, ref
