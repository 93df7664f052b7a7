"""A version's PyTorch source: the trainable module an ONNX version was exported from, kept with it.

Online learning, federated rounds and exact-gradient explanations need the model as PyTorch, not as
an ONNX graph. ``leanserve export --name`` and ``leanserve demo`` attach a TorchScript copy of the module
(``torch_source.pt``) to the version they register; a TorchScript version is its own source. TorchScript
keeps parameters trainable and loads without the Python class that defined the model.
"""

from __future__ import annotations

from pathlib import Path

from leanserve.artifact import ModelArtifact
from leanserve.errors import ExportError, UnsupportedFormat

SOURCE_FILE = "torch_source.pt"


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
