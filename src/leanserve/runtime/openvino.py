"""OpenVINO engine (optional extra ``leanserve[openvino]``): compile an ONNX or IR model for the CPU, an
Intel GPU or an NPU, tuned for latency or throughput."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import openvino as ov

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError, UnsupportedFormat

log = logging.getLogger(__name__)

# "auto" prefers an accelerator when one is present; GPU first because the NPU compiles static shapes only.
_AUTO_PREFERENCE = ("GPU", "NPU")
_HINTS = {"auto": "LATENCY", "latency": "LATENCY", "throughput": "THROUGHPUT"}


def choose_device(requested: str, available: Sequence[str]) -> str:
    """The OpenVINO device to compile for: ``requested`` (cpu, gpu, npu) when listed in ``available``;
    for ``auto`` the first GPU, else the first NPU, else CPU. Devices are matched by family, so "gpu"
    takes "GPU.0" when that is how OpenVINO lists it. Raises UnsupportedFormat naming the available
    devices when an explicit request is absent."""
    if requested == "auto":
        for family in _AUTO_PREFERENCE:
            found = _first_of(family, available)
            if found:
                return found
        return "CPU"
    found = _first_of(requested.upper(), available)
    if found is None:
        raise UnsupportedFormat(
            f"OpenVINO device {requested!r} is not available here; available: {', '.join(available) or 'none'}"
        )
    return found


def _first_of(family: str, available: Sequence[str]) -> str | None:
    return next((d for d in available if d.split(".", 1)[0] == family), None)


def compile_config(device: str, options: RuntimeOptions) -> dict[str, object]:
    """OpenVINO properties for ``device``: performance hint and inference precision, and on the CPU
    pinning and thread count."""
    config: dict[str, object] = {
        "PERFORMANCE_HINT": _HINTS[options.performance_hint],
        # Left to itself OpenVINO computes in bf16 on CPUs that have it and in f16 on GPUs; fp32 must mean
        # fp32. An int8 model's QDQ nodes decide what runs in int8; the rest stays f32.
        "INFERENCE_PRECISION_HINT": {"fp16": "f16", "bf16": "bf16"}.get(options.precision, "f32"),
    }
    if device.split(".", 1)[0] == "CPU":
        # Measured here: unpinned, two inference threads on MiniLM ran at the speed of one.
        config["ENABLE_CPU_PINNING"] = True
        if options.intra_op_threads:
            config["INFERENCE_NUM_THREADS"] = options.intra_op_threads
    return config


class OpenVinoSession:
    """An OpenVINO compiled model behind the Session protocol; one infer request per calling thread."""

    engine = "openvino"

    def __init__(self, compiled: ov.CompiledModel, signature: Signature, device: str) -> None:
        self.compiled = compiled  # the OpenVINO CompiledModel, for inspecting its properties
        self.signature = signature
        self.device = device
        self._local = threading.local()
        self._output_index = _output_indices(compiled, signature)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # share_outputs=False: the arrays are copies, not views into this request's buffers, which the
        # next run on this thread overwrites.
        result = request.infer(dict(inputs), share_inputs=True, share_outputs=False)
        return {name: result[self._output_index[name]] for name in (outputs or self.signature.output_names)}

    def close(self) -> None:
        self._local = threading.local()
        self.compiled = None  # type: ignore[assignment]


def _output_indices(compiled: ov.CompiledModel, signature: Signature) -> dict[str, int]:
    """Signature output name -> compiled output index: by tensor name, else by position."""
    by_name = {name: i for i, port in enumerate(compiled.outputs) for name in port.get_names()}
    return {spec.name: by_name.get(spec.name, i) for i, spec in enumerate(signature.outputs)}


def load(artifact: ModelArtifact, options: RuntimeOptions) -> OpenVinoSession:
    """Read ``artifact`` (ONNX or OpenVINO IR) and compile it for ``options.device`` with its performance hint.

    With device "auto", an accelerator that cannot compile the model (an NPU and a dynamic batch, say)
    falls back to the CPU. Raises UnsupportedFormat when an explicitly requested device is absent and
    ModelLoadError, with OpenVINO's complaint, when the model cannot be read or compiled.
    """
    core = ov.Core()
    device = choose_device(options.device, core.available_devices)
    name = artifact.model_path.name
    try:
        model = core.read_model(str(artifact.model_path))
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO cannot read {name}: {complaint(exc)}") from exc
    try:
        compiled = _compile(core, model, device, options, name)
    except ModelLoadError as exc:
        if options.device != "auto" or device == "CPU":
            raise
        log.warning("%s; using the CPU instead", exc)
        device = "CPU"
        compiled = _compile(core, model, device, options, name)
    return OpenVinoSession(compiled, artifact.signature, device)


def _compile(core: ov.Core, model: ov.Model, device: str, options: RuntimeOptions, name: str) -> ov.CompiledModel:
    try:
        config = compile_config(device, options)
        if config["INFERENCE_PRECISION_HINT"] == "bf16" and "BF16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
            log.warning("%s has no bf16 support; runtime.precision=bf16 runs in f32 there", device)
            config["INFERENCE_PRECISION_HINT"] = "f32"
        return core.compile_model(model, device, config)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO cannot compile {name} for {device}: {complaint(exc)}") from exc


def complaint(exc: Exception) -> str:
    """OpenVINO's message without the source-location lines it wraps every error in, on one line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Exception from ", "Check '", "Summary:"))]
    text = " ".join(kept) or str(exc).strip()
    return text if len(text) <= 400 else text[:397] + "..."
