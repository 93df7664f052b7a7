"""Runtimes: load a model version into a session that maps named numpy arrays to named numpy arrays.

One small protocol (``Session``), one module per engine, and a dict from engine name to loader. Engines
are imported only when a version asks for them, so ``import leanserve`` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat

# engine name -> (module, extra that installs it)
ENGINES: dict[str, tuple[str, str | None]] = {
    "onnxruntime": ("leanserve.runtime.onnxruntime", None),
    "torch": ("leanserve.runtime.torch", "torch"),
    "openvino": ("leanserve.runtime.openvino", "openvino"),
    "tvm": ("leanserve.runtime.tvm", "tvm"),
    "executorch": ("leanserve.runtime.executorch", "edge"),
    "postprocessed": ("leanserve.fairness.postprocessed", None),
    "pipeline": ("leanserve.runtime.pipeline", "text"),
}


class Session(Protocol):
    """A loaded model, ready to run. Implementations must be safe to call from several threads."""

    engine: str
    signature: Signature

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run validated inputs; return the requested outputs (all when ``outputs`` is None)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


def engine_module(engine: str):
    """The runtime module of ``engine``; UnsupportedFormat naming the extra to install when it is missing."""
    if engine not in ENGINES:
        raise UnsupportedFormat(f"unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")
    module_name, extra = ENGINES[engine]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UnsupportedFormat(
            f"engine {engine!r} is not installed ({exc.name or exc}); install it with: pip install 'leanserve[{extra}]'"
        ) from exc


def prepare(engine: str, onnx_path: Path, workdir: Path, signature: Signature, options: RuntimeOptions,
            time_budget_s: float = 600.0) -> Path:
    """Turn an ONNX model into what ``engine`` loads: the ONNX file itself for engines that read ONNX,
    a compiled artifact for engines that compile ahead of time (an engine module's optional
    ``prepare(onnx_path, workdir, signature, options, time_budget_s) -> Path``). The returned file is
    what ``leanserve.formats.read_model`` and the repository accept."""
    hook = getattr(engine_module(engine), "prepare", None)
    return Path(hook(onnx_path, workdir, signature, options, time_budget_s)) if hook else onnx_path


def load_session(artifact: ModelArtifact, options: RuntimeOptions | None = None) -> Session:
    """Load ``artifact`` with its engine (``options.engine`` or the manifest's runtime).

    Raises UnsupportedFormat when the engine is unknown or its extra is not installed, and
    ModelLoadError when the engine rejects the model.
    """
    options = options or RuntimeOptions()
    if artifact.manifest.format == "c_source":
        source = f"{artifact.path.parent.name}:{artifact.path.name}"
        raise UnsupportedFormat(f"{source} is C source code for microcontrollers (leanserve edge --target c), compiled "
                                f"into a device's firmware; it is not served or run by leanserve: serve its parent "
                                f"version ({artifact.manifest.provenance.parent or 'the ONNX version'}) instead")
    engine = options.engine or artifact.manifest.default_runtime
    module = engine_module(engine)
    if not hasattr(module, "wrap"):
        return module.load(artifact, options)
    # A model inside stages (pipeline) or a decision rule (post-processed): the inner model is loaded
    # here, with its format's engine, so the wrapping module never imports the runtime that loads it.
    inner_options = replace(options, engine=None) if options.engine == engine else options
    inner = load_session(module.inner_artifact(artifact), inner_options)
    try:
        return module.wrap(inner, artifact)
    except (InvalidInput, ModelLoadError, UnsupportedFormat):
        inner.close()
        raise


def load_file(path: str | Path, options: RuntimeOptions | None = None) -> Session:
    """Load a model file that is not (yet) a repository version: a candidate being measured, a compiled
    artifact. Its format and signature are read from the file; the engine is ``options.engine`` or the
    format's own. Raises what ``read_model`` and ``load_session`` raise."""
    from leanserve.artifact import Manifest
    from leanserve.formats import read_model

    path = Path(path)
    source = read_model(path)
    return load_session(ModelArtifact(path.parent, Manifest(source.format, path.name, source.signature, {})), options)


def example_inputs(signature: Signature, batch_size: int = 1, dynamic_size: int = 1) -> dict[str, np.ndarray]:
    """Zero-filled inputs matching ``signature`` (dynamic dims: ``batch_size`` first, then ``dynamic_size``).

    Used to warm a session up and to check that a model loads and runs.
    """
    arrays = {}
    for spec in signature.inputs:
        shape = tuple(
            (batch_size if axis == 0 else dynamic_size) if d == -1 else d for axis, d in enumerate(spec.shape)
        )
        if spec.datatype == "BYTES":
            arrays[spec.name] = np.full(shape, b"", dtype=object)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return arrays


def check_runs(session: Session) -> None:
    """Run one zero-filled request; raise ModelLoadError naming the engine's complaint if it fails."""
    try:
        session.run(example_inputs(session.signature))
    except Exception as exc:  # engines raise their own exception types; report any as a load failure
        raise ModelLoadError(f"the model loaded but failed a test run with zero inputs: {exc}") from exc
