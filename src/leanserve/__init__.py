"""leanserve: turn a trained neural network into a fast, safe, monitored inference service.

The Python API mirrors the CLI: ``Repository`` (import, list, inspect, remove versions), ``load`` (a
version ready to predict) and ``export`` (PyTorch module -> verified ONNX).
"""

from __future__ import annotations

import os as _os

# leanserve never phones home, and neither do the libraries it drives (users may override).
for _key, _value in {
    "ORT_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    _os.environ.setdefault(_key, _value)

from leanserve.artifact import Manifest, ModelArtifact, Provenance, Signature, TensorSpec  # noqa: E402
from leanserve.config import BatchingConfig, CacheConfig, ModelConfig, RuntimeOptions, TrafficConfig, VersionPolicy  # noqa: E402
from leanserve.errors import (  # noqa: E402
    CorruptArtifact,
    ExportError,
    InvalidInput,
    LeanserveError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    UnsupportedFormat,
)
from leanserve.model import Model, load  # noqa: E402
from leanserve.repository import Repository, VersionRef  # noqa: E402

__version__ = "0.1.0"


def export(module, example_inputs, path, **kwargs):
    """Export a PyTorch module to a verified ONNX file; see ``leanserve.from_torch.export``."""
    from leanserve.from_torch import export as _export

    return _export(module, example_inputs, path, **kwargs)


__all__ = [
    "BatchingConfig", "CacheConfig", "CorruptArtifact", "ExportError", "InvalidInput", "LeanserveError",
    "Manifest", "Model", "ModelArtifact", "ModelConfig", "ModelLoadError", "ModelNotFound", "Overloaded",
    "Provenance", "Repository", "RuntimeOptions", "Signature", "TensorSpec", "TrafficConfig",
    "UnsupportedFormat", "VersionPolicy", "VersionRef", "export", "load",
]
