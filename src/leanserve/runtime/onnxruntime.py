"""ONNX Runtime engine: the default. Picks TensorRT/CUDA execution providers when present, else CPU."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError, UnsupportedFormat

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402  (telemetry must be off before import)

TRT_CALIBRATION_TABLE = "calibration.flatbuffers"  # the int8 table's name, as TensorRT's provider is given it

log = logging.getLogger(__name__)


def native_log_severity() -> int:
    """ONNX Runtime's own log level (it logs from C++ as ``[W:onnxruntime:...]`` lines): 2, its warnings,
    when the ``onnxruntime`` logger is on at INFO (``leanserve -v``); else 3, errors only."""
    return 2 if logging.getLogger("onnxruntime").isEnabledFor(logging.INFO) else 3


# The default logger serves the sessions other code opens without a level of its own (the quantizer's
# calibration, the ORT-format converter), as session_options serves ours.
ort.set_default_logger_severity(native_log_severity())

_GPU_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Execution providers to use: the requested ones (all must exist), else GPU ones present, then CPU."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise UnsupportedFormat(
                f"execution provider {missing[0]} is not available here; available: {', '.join(available)}"
            )
        return list(requested)
    chosen = [p for p in _GPU_PREFERENCE if p in available]
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeSession:
    """An ``onnxruntime.InferenceSession`` behind the Session protocol."""

    engine = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, signature: Signature) -> None:
        self._session = session
        self.signature = signature
        self.providers = session.get_providers()
        self._all_outputs = signature.output_names
        self._string_inputs = {s.name for s in signature.inputs if s.datatype == "BYTES"}

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._all_outputs
        feed = dict(inputs)
        for name in self._string_inputs & feed.keys():
            # ORT's string tensors take Python str, the wire gives bytes.
            feed[name] = np.vectorize(_to_str, otypes=[object])(feed[name])
        results = self._session.run(names, feed)
        return {name: _from_ort(value) for name, value in zip(names, results)}

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]


def _to_str(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _from_ort(value: np.ndarray) -> np.ndarray:
    if value.dtype == object:
        return np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(value)
    return value


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    """ORT session options from leanserve's runtime options."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[options.graph_optimization_level]
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads:
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    so.log_severity_level = native_log_severity()
    if not options.spin_wait:
        # Spinning worker threads shave microseconds off one stream but steal the core the server's
        # event loop needs (a one-off run at 16 clients showed a much lower p99 without spinning).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def engine_cache_dir(artifact: ModelArtifact) -> Path:
    """Where TensorRT keeps the engines it builds for a version: beside the version folder (which is
    checksummed and read-only), so a restart reuses them instead of rebuilding for minutes."""
    return artifact.path.parent / ".engine-cache" / artifact.path.name


def provider_options(providers: Sequence[str], options: RuntimeOptions, artifact: ModelArtifact) -> list:
    """Execution providers with their settings: TensorRT gets its engine cache, fp16 or int8 (int8 from
    the version's calibration table, or from the QDQ scales of an int8 model); the rest run as they are."""
    chosen: list = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            cache = engine_cache_dir(artifact)
            settings = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}
            if options.precision == "fp16":
                settings["trt_fp16_enable"] = "True"
            elif options.precision == "bf16":
                settings["trt_bf16_enable"] = "True"
            elif options.precision == "int8":
                settings.update(_trt_int8(artifact, cache))
            chosen.append((provider, settings))
        else:
            chosen.append(provider)
    return chosen


def _trt_int8(artifact: ModelArtifact, cache: Path) -> dict[str, str]:

    settings = {"trt_int8_enable": "True"}
    table = artifact.path / TRT_CALIBRATION_TABLE
    if table.is_file():
        # the provider reads the table from its cache folder
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(table, cache / TRT_CALIBRATION_TABLE)
        settings["trt_int8_calibration_table_name"] = TRT_CALIBRATION_TABLE
    elif not _has_qdq(artifact.model_path):
        raise UnsupportedFormat(f"int8 on TensorRT needs the version's calibration table ({TRT_CALIBRATION_TABLE}, "
                                "written by leanserve optimize from --calib data) or an int8 (QDQ) model")
    return settings


def _has_qdq(path: Path) -> bool:
    import onnx

    return any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path), load_external_data=False).graph.node)


def load(artifact: ModelArtifact, options: RuntimeOptions) -> OnnxRuntimeSession:
    """Create an InferenceSession for ``artifact``; raise ModelLoadError if ORT rejects the model.

    GPU providers that fail to start (a missing TensorRT or CUDA library, no device) are dropped one by
    one with the reason logged, down to the CPU, unless the user asked for them by name."""
    providers = choose_providers(options.providers, ort.get_available_providers())
    while True:
        try:
            session = ort.InferenceSession(str(artifact.model_path), session_options(options),
                                           providers=provider_options(providers, options, artifact))
            break
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, ort.capi.onnxruntime_pybind11_state.NoSuchFile,
                RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if providers[0] in _GPU_PREFERENCE and not options.providers:
                log.warning("%s cannot run %s (%s); falling back to %s", providers[0], artifact.model_path.name,
                            reason, providers[1])
                providers = providers[1:]
                continue
            raise ModelLoadError(f"ONNX Runtime cannot load {artifact.model_path.name}: {reason}") from exc
    return OnnxRuntimeSession(session, artifact.signature)
