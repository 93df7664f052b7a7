"""PyTorch engine: TorchScript archives and ``torch.export`` programs, loaded without arbitrary unpickling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError


class TorchSession:
    """A TorchScript module or an exported program's module behind the Session protocol."""

    engine = "torch"

    def __init__(self, module: torch.nn.Module, signature: Signature) -> None:
        self._module = module
        self.signature = signature

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.signature.inputs]
        with torch.inference_mode():
            result = self._module(*args)
        values = result if isinstance(result, (tuple, list)) else (result,)
        if len(values) != len(self.signature.outputs):
            raise ModelLoadError(
                f"the model returned {len(values)} outputs, its signature declares {len(self.signature.outputs)}"
            )
        named = {spec.name: value.detach().cpu().numpy() for spec, value in zip(self.signature.outputs, values)}
        return {name: named[name] for name in (outputs or named)}

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]


def load(artifact: ModelArtifact, options: RuntimeOptions) -> TorchSession:
    """Load a TorchScript (``torch.jit.load``) or torch.export (``torch.export.load``) artifact."""
    if options.intra_op_threads:
        torch.set_num_threads(options.intra_op_threads)  # process-wide in PyTorch
    path = str(artifact.model_path)
    try:
        if artifact.manifest.format == "torchscript":
            module = torch.jit.load(path, map_location="cpu")
            module.eval()
        elif artifact.manifest.format == "torch_export":
            module = torch.export.load(path).module()
        else:
            raise ModelLoadError(f"the torch engine cannot run {artifact.manifest.format} models")
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"PyTorch cannot load {artifact.model_path.name}: {str(exc).splitlines()[0]}") from exc
    return TorchSession(module, artifact.signature)
