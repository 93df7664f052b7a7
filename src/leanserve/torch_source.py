"""A version's PyTorch source: the trainable module an ONNX version was exported from, kept with it.

Online learning, federated rounds and exact-gradient explanations need the model as PyTorch, not as
an ONNX graph. ``leanserve export --name`` and ``leanserve demo`` attach a TorchScript copy of the module
(``torch_source.pt``) to the version they register; a TorchScript version is its own source. TorchScript
keeps parameters trainable and loads without the Python class that defined the model.

Device compilers (ExecuTorch) read ``torch.export`` programs, which TorchScript cannot become, so the same
commands also attach the module as an exported program (``torch_source.pt2``, batch axis dynamic where
the module allows it, else the example's fixed shapes: logged, and recorded inside the program, where
``program_export_info`` reads it); a torch.export version is its own program.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from leanserve.artifact import ModelArtifact
from leanserve.errors import ExportError, UnsupportedFormat

log = logging.getLogger(__name__)

SOURCE_FILE = "torch_source.pt"
PROGRAM_FILE = "torch_source.pt2"
EXPORT_INFO = "leanserve_export.json"  # inside the .pt2 archive: how the program was exported


def save_source(module, example_inputs, folder: str | Path) -> Path:
    """TorchScript of ``module`` (traced on ``example_inputs``) at ``folder/torch_source.pt``, for
    ``Repository.add(..., attachments=[path])``. Raises ExportError when the module cannot be traced."""
    import torch

    path = Path(folder) / SOURCE_FILE
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            scripted = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(scripted, str(path))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ExportError(f"the PyTorch source cannot be kept with the version (tracing failed: {exc})") from exc
    finally:
        module.train(was_training)
    return path


def has_source(artifact: ModelArtifact) -> bool:
    return (artifact.path / SOURCE_FILE).is_file() or artifact.manifest.format == "torchscript"


def load_source(artifact: ModelArtifact):
    """The version's PyTorch module (TorchScript, in eval mode), or UnsupportedFormat saying how to get one."""
    import torch

    path = artifact.path / SOURCE_FILE
    if not path.is_file() and artifact.manifest.format == "torchscript":
        path = artifact.model_path
    if not path.is_file():
        raise UnsupportedFormat(f"{artifact.path.parent.name}:{artifact.path.name} has no PyTorch source; register the "
                                "model with `leanserve export FILE.py:FUNC --name NAME` (which keeps one) to learn from it")
    return torch.jit.load(str(path)).eval()


def find_source(repo, artifact: ModelArtifact, max_hops: int = 10):
    """The version's PyTorch module, or its parent's (an optimized version keeps the float model's source
    through its provenance, up to ``max_hops`` parents of the same model; ``repo`` is its Repository). Raises
    UnsupportedFormat naming the version when there is none."""
    current = artifact
    for _ in range(max_hops):
        if has_source(current):
            return load_source(current).train()
        parent = current.manifest.provenance.parent or ""
        name, _, version = parent.rpartition(":")
        if name != artifact.path.parent.name or not version.isdigit() or int(version) not in repo.versions(name):
            break
        current = repo.get(name, int(version))
    return load_source(artifact)  # raises the message that says how to get a source


def save_program(module, example_inputs, folder: str | Path) -> Path | None:
    """``torch.export`` program of ``module`` at ``folder/torch_source.pt2`` (first axis of every input
    dynamic where the module allows it), for ``Repository.add(..., attachments=[path])``. Returns None,
    with a warning, when the module cannot be exported: the version is still useful without it, only
    ``leanserve edge --target executorch`` needs it."""
    import torch

    path = Path(folder) / PROGRAM_FILE
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        program, info = _export(module, example)
        torch.export.save(program, str(path), extra_files={EXPORT_INFO: json.dumps(info)})
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, RuntimeError, ...)
        log.warning("no torch.export program kept with the version, so `leanserve edge --target executorch` "
                    "cannot use it: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    finally:
        module.train(was_training)
    return path


def _export(module, example: tuple) -> tuple:
    """(program, info): exported with a dynamic batch axis, or, when the module fixes its batch size (or
    the example has one row), with the example's shapes; ``info`` says which and why, for the version."""
    import torch

    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in example))
        return program, {"batch_axis": "dynamic", "fallback": None}
    except RuntimeError as exc:  # UserError "Constraints violated (batch)", or a shape error: the batch axis is fixed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    rows = int(example[0].shape[0]) if example and hasattr(example[0], "shape") and example[0].dim() else 1
    log.warning("torch.export with a dynamic batch axis failed (%s); the program keeps the example's fixed shapes "
                "(batch %d), so device compilers see only that batch size", reason, rows)
    program = torch.export.export(module, example)
    return program, {"batch_axis": f"fixed ({rows})", "fallback": f"dynamic batch export failed: {reason}"}


def program_export_info(path: str | Path) -> dict:
    """How the program at ``path`` was exported: ``{"batch_axis": "dynamic" or "fixed (N)", "fallback":
    None or why the dynamic export failed}``; ``{}`` for a program leanserve did not write."""
    import torch

    extra = {EXPORT_INFO: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[EXPORT_INFO]) if extra[EXPORT_INFO] else {}


def has_program(artifact: ModelArtifact) -> bool:
    return (artifact.path / PROGRAM_FILE).is_file() or artifact.manifest.format == "torch_export"


def load_program(artifact: ModelArtifact):
    """The version's ``torch.export.ExportedProgram``, or UnsupportedFormat saying how to get one."""
    import torch

    path = artifact.path / PROGRAM_FILE
    if not path.is_file() and artifact.manifest.format == "torch_export":
        path = artifact.model_path
    if not path.is_file():
        raise UnsupportedFormat(
            f"{artifact.path.parent.name}:{artifact.path.name} has no torch.export program ({PROGRAM_FILE}); register "
            "the model with `leanserve export FILE.py:FUNC --name NAME` (which keeps one) or import a .pt2 file")
    return torch.export.load(str(path))
