"""A version's PyTorch source: the trainable module an ONNX version was exported from, kept with it.

Online learning, federated rounds and exact-gradient explanations need the model as PyTorch, not as
an ONNX graph. ``leanserve export --name`` and ``leanserve demo`` attach a TorchScript copy of the module
(``torch_source.pt``) to the version they register; a TorchScript version is its own source. TorchScript
keeps parameters trainable and loads without the Python class that defined the model.

Device compilers (ExecuTorch) read ``torch.export`` programs, which TorchScript cannot become, so the same
commands also attach the module as an exported program (``torch_source.pt2``, batch axis dynamic); a
torch.export version is its own program.
"""

from __future__ import annotations

import logging
from pathlib import Path

from leanserve.artifact import ModelArtifact
from leanserve.errors import ExportError, UnsupportedFormat

log = logging.getLogger(__name__)

SOURCE_FILE = "torch_source.pt"
PROGRAM_FILE = "torch_source.pt2"


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
        torch.export.save(_export(module, example), str(path))
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, RuntimeError, ...)
        log.warning("no torch.export program kept with the version, so `leanserve edge --target executorch` "
                    "cannot use it: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    finally:
        module.train(was_training)
    return path


def _export(module, example: tuple):
    import torch

    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in example))
    except Exception:  # a fixed batch axis (or an example of one row): the program keeps the example's shapes
        return torch.export.export(module, example)


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
