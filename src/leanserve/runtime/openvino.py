"""OpenVINO engine (optional extra ``leanserve[openvino]``): compile an ONNX or IR model for the CPU."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import openvino as ov

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError


class OpenVinoSession:
    """An OpenVINO compiled model behind the Session protocol; one infer request per thread."""

    engine = "openvino"

    def __init__(self, compiled: ov.CompiledModel, signature: Signature) -> None:
        self._compiled = compiled
        self.signature = signature
        self._local = threading.local()

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({name: array for name, array in inputs.items()}, share_inputs=True)
        named = {spec.name: np.array(result[port]) for spec, port in zip(self.signature.outputs, self._compiled.outputs)}
        return {name: named[name] for name in (outputs or named)}

    def close(self) -> None:
        self._compiled = None  # type: ignore[assignment]


def load(artifact: ModelArtifact, options: RuntimeOptions) -> OpenVinoSession:
    """Read and compile ``artifact`` for the CPU with a latency hint."""
    config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": True}
    if options.intra_op_threads:
        config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(artifact.model_path)), "CPU", config)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO cannot load {artifact.model_path.name}: {str(exc).splitlines()[0]}") from exc
    return OpenVinoSession(compiled, artifact.signature)
