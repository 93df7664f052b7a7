"""ExecuTorch engine: ``.pte`` programs (built by ``leanserve edge --target executorch``) run by ExecuTorch's
own Python runtime, with the delegates it was built with (XNNPACK on CPU).

The programs leanserve builds have a static batch of one row, as a device runs them, so a request of
several rows runs row by row. ExecuTorch's Python runtime links libtorch; a device links only the
C++ runtime, so memory measured here is not a device's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import ModelLoadError


@contextlib.contextmanager
def quiet_torchao():
    # torchao, imported by the runtime, logs a warning per CUDA kernel library a CPU build cannot load;
    # shown only when its logger is on at INFO (``leanserve -v``)
    logger = logging.getLogger("torchao")
    if logger.isEnabledFor(logging.INFO):
        yield
        return
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_native_log():
    """Point fd 2 at /dev/null inside the block unless the ``executorch`` logger is on at INFO (``leanserve -v``).

    ExecuTorch's runtime logs from C++ straight to fd 2 (its log level is fixed when the wheel is built,
    and no Python API changes it): creating its thread pool prints five ``[cpuinfo_utils.cpp]`` lines
    about files a non-ARM machine does not have, and resizing it one more. The redirect is process-wide,
    so it wraps only those two thread-pool calls, which take microseconds, never a program's load or run.
    """
    if logging.getLogger("executorch").isEnabledFor(logging.INFO):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with quiet_torchao():
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

METHOD = "forward"


class ExecuTorchSession:
    """One loaded program's ``forward`` behind the Session protocol; calls are serialized (a method owns
    its planned memory, so two runs at once would share it)."""

    engine = "executorch"

    def __init__(self, method, signature: Signature, row_by_row: bool) -> None:
        self._method = method
        self.signature = signature
        self._row_by_row = row_by_row
        self._lock = threading.Lock()

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        arrays = [np.ascontiguousarray(inputs[s.name]) for s in self.signature.inputs]
        if self._row_by_row:
            rows = [self._execute([a[i:i + 1] for a in arrays]) for i in range(len(arrays[0]))]
            values = [np.concatenate(parts) for parts in zip(*rows)] if rows else self._empty(arrays)
        else:
            values = self._execute(arrays)
        named = dict(zip(self.signature.output_names, values))
        return {name: named[name] for name in (outputs or named)}

    def _execute(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            results = self._method.execute([torch.from_numpy(a) for a in arrays])
            # outputs live in the method's planned memory, which the next run overwrites
            return [r.numpy().copy() for r in results]

    def _empty(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        shaped = self._execute([np.zeros((1, *a.shape[1:]), a.dtype) for a in arrays])
        return [np.zeros((0, *v.shape[1:]), v.dtype) for v in shaped]

    def close(self) -> None:
        self._method = None


def set_threads(threads: int) -> None:
    """Size the runtime's (process-wide) thread pool that XNNPACK runs on. The Python runtime's only knob
    for it is marked unsafe while a method runs, so it is set before programs load. The first call creates
    the pool (and its cpuinfo lines): on first use, not at import, so a process that never runs a program
    never starts its threads."""
    with quiet_native_log():
        current = portable_lib._threadpool_get_thread_count()
    if threads and current != threads:
        with quiet_native_log():
            portable_lib._unsafe_reset_threadpool(threads)


def load(artifact: ModelArtifact, options: RuntimeOptions) -> ExecuTorchSession:
    """Load ``artifact``'s program and its ``forward`` method; ModelLoadError when ExecuTorch rejects the
    file or its inputs and outputs do not match the version's signature."""
    if artifact.manifest.format != "executorch":
        raise ModelLoadError(f"the executorch engine runs ExecuTorch programs (.pte), not {artifact.manifest.format} "
                             "models; build one with `leanserve edge MODEL --target executorch`")
    set_threads(options.intra_op_threads)
    try:
        program = Runtime.get().load_program(artifact.model_path)
        method = program.load_method(METHOD)
        meta = program.metadata(METHOD)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"ExecuTorch cannot load {artifact.model_path.name}: {str(exc).splitlines()[0]}") from exc
    if method is None:
        raise ModelLoadError(f"{artifact.model_path.name} has no {METHOD!r} method")
    _check_meta(artifact, meta)
    row_by_row = any(s.shape and s.shape[0] == -1 for s in artifact.signature.inputs)
    return ExecuTorchSession(method, artifact.signature, row_by_row)


def _check_meta(artifact: ModelArtifact, meta) -> None:
    signature = artifact.signature
    if meta.num_inputs() != len(signature.inputs) or meta.num_outputs() != len(signature.outputs):
        raise ModelLoadError(
            f"{artifact.model_path.name} takes {meta.num_inputs()} inputs and returns {meta.num_outputs()} outputs; "
            f"its signature declares {len(signature.inputs)} and {len(signature.outputs)}")
    for i, spec in enumerate(signature.inputs):
        sizes = list(meta.input_tensor_meta(i).sizes())
        expected = [1 if d == -1 and axis == 0 else d for axis, d in enumerate(spec.shape)]
        if sizes != expected:
            raise ModelLoadError(f"{artifact.model_path.name}: input {spec.name!r} is {sizes} in the program, "
                                 f"{list(spec.shape)} in the signature (a batch axis runs one row at a time)")
