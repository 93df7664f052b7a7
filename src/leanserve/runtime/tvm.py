"""Apache TVM engine (optional extra ``leanserve[tvm]``): an ONNX model compiled ahead of time for this CPU.

``prepare`` imports the ONNX model with TVM's Relax frontend, compiles it for the host CPU (tuned with
MetaSchedule when the time budget allows) and writes ``<stem>.tvm.so`` plus a sidecar ``<stem>.tvm.json``
that records the target, the CPU, the TVM version, the tuning and the signature. ``load`` refuses a
library built for another CPU before touching it: code compiled for a newer CPU dies with SIGILL.

Shapes are static: TVM's kernels are only fast for fixed shapes. Dynamic dimensions are compiled at
batch 1 and size 1 elsewhere. When every input and output has a dynamic batch dimension, the session
runs a larger batch row by row and stacks the results, so dynamic batching still works; any other
shape is refused with InvalidInput naming the compiled shape.

Loading a ``.so`` runs native code, as loading any shared library does: serve only libraries you built.
TVM has no telemetry to switch off (none known); tuning runs in local worker processes only.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Signature, TensorSpec
from leanserve.config import RuntimeOptions
from leanserve.errors import InvalidInput, ModelLoadError, UnsupportedFormat
from leanserve.formats import tvm_sidecar

# TVM sizes each calling thread's worker pool from TVM_NUM_THREADS, else half the logical CPUs (it
# assumes hyper-threading): on a 2-core machine without SMT that is one thread. Use every core we may.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
import tvm  # noqa: E402  (the thread count must be set before TVM creates a pool)
from tvm import relax  # noqa: E402

SIDECAR_VERSION = 1
MIN_TUNING_BUDGET_S = 60.0
# Measured here (2-core EPYC, busy, digits CNN): 355 MetaSchedule trials took ~520 s, ~1.5 s each. The
# trial count is derived from it and a deadline callback ends tuning early, but only between batches:
# the scheduler first gives every task one batch, so a short budget overruns (629 s for 420 s here).
SECONDS_PER_TRIAL = 1.5
_TRIALS_PER_ITER = 64  # the builder restarts its workers for every batch: big batches amortize that
_AFFINITY_BIG_CORES = 1  # TVM's ThreadGroup::kBig: the default placement


def host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. ``znver4``): what ``mcpu`` must be for code to run here."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target() -> dict[str, Any]:
    """The TVM target for this CPU with every core we may use, as a JSON-ready dict."""
    return {"kind": "llvm", "mcpu": host_cpu(), "num-cores": len(os.sched_getaffinity(0))}


# --- compiling ------------------------------------------------------------------------------------

def prepare(onnx_path: Path, workdir: Path, signature: Signature, options: RuntimeOptions,
            time_budget_s: float = 600.0) -> Path:
    """Compile ``onnx_path`` for this CPU into ``workdir/<stem>.tvm.so`` (+ ``<stem>.tvm.json``).

    With ``time_budget_s >= MIN_TUNING_BUDGET_S`` the kernels are tuned with MetaSchedule for about
    that long (a target, not a hard limit: see SECONDS_PER_TRIAL); otherwise TVM's default schedules are used (far slower than ONNX Runtime on a small CNN
    in one-off runs; benchmarks/tvm_bench.py measures it). Returns the library's path. Raises UnsupportedFormat for string inputs or a non-CPU
    device, and ModelLoadError when TVM cannot import or compile the model.
    """
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    if options.device not in ("auto", "cpu"):
        raise UnsupportedFormat(f"the TVM engine compiles for the CPU only, not device {options.device!r}")
    strings = [s.name for s in signature.inputs + signature.outputs if s.datatype == "BYTES"]
    if strings:
        raise UnsupportedFormat(f"{onnx_path.name}: TVM cannot compile string tensors ({', '.join(strings)})")
    shapes, batch_rows = compiled_shapes(signature)
    target = tvm.target.Target(host_target())
    try:
        mod = from_onnx(
            onnx.load(str(onnx_path)), shape_dict=shapes,
            dtype_dict={s.name: str(s.dtype) for s in signature.inputs}, keep_params_in_input=False,
        )
        mod = relax.transform.DecomposeOpsForInference()(mod)  # BatchNorm -> multiply/add
        started = time.monotonic()
        if time_budget_s >= MIN_TUNING_BUDGET_S:
            executable, tuning = _tune_and_compile(mod, target, Path(workdir), started + time_budget_s)
        else:
            executable, tuning = tvm.compile(mod, target=target), {"tuning_trials": 0, "tuning_s": 0.0}
        compile_s = time.monotonic() - started
        library = Path(workdir) / f"{onnx_path.stem}.tvm.so"
        executable.export_library(str(library))
        outputs = _output_shapes(library, signature, shapes)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # TVM's errors are RuntimeErrors
        raise ModelLoadError(f"TVM cannot compile {onnx_path.name}: {_first_line(exc)}") from exc
    served = _served_signature(signature, shapes, outputs, batch_rows)
    sidecar = {
        "sidecar_version": SIDECAR_VERSION,
        "source": onnx_path.name,
        "target": host_target(),
        "host_cpu": host_cpu(),
        "tvm_version": tvm.__version__,
        "tuned": tuning["tuning_trials"] > 0,
        **tuning,
        "tuning_budget_s": round(float(time_budget_s), 1),
        "compile_s": round(compile_s, 1),  # tuning included
        "compiled_shapes": {name: list(shape) for name, shape in shapes.items()},
        "batch_rows": batch_rows,
        "signature": served.to_dict(),
    }
    tvm_sidecar(library).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    return library


def compiled_shapes(signature: Signature) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Static input shapes to compile (dynamic dims -> 1) and whether larger batches may run row by row.

    Row by row needs every input and output to have a dynamic first (batch) dimension.
    """
    shapes = {s.name: tuple(1 if d == -1 else d for d in s.shape) for s in signature.inputs}
    batch_rows = all(s.shape and s.shape[0] == -1 for s in signature.inputs + signature.outputs)
    return shapes, batch_rows


def _served_signature(signature: Signature, shapes: Mapping[str, tuple[int, ...]],
                      outputs: Sequence[tuple[int, ...]], batch_rows: bool) -> Signature:
    """The signature the library serves: compiled shapes, with the batch dim left dynamic if row by row."""
    def spec(old: TensorSpec, shape: Sequence[int]) -> TensorSpec:
        return TensorSpec(old.name, old.datatype, ((-1,) + tuple(shape[1:])) if batch_rows else tuple(shape))

    return Signature(tuple(spec(s, shapes[s.name]) for s in signature.inputs),
                     tuple(spec(s, shape) for s, shape in zip(signature.outputs, outputs)))


def _output_shapes(library: Path, signature: Signature, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Run the fresh library once on zeros: checks it loads here and gives the compiled output shapes."""
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    zeros = [np.zeros(shapes[s.name], dtype=s.dtype) for s in signature.inputs]
    results = _as_list(vm["main"](*[tvm.runtime.tensor(z) for z in zeros]))
    if len(results) != len(signature.outputs):
        raise ModelLoadError(f"TVM's build returns {len(results)} outputs, the ONNX model has {len(signature.outputs)}")
    return [tuple(r.shape) for r in results]


def _tune_and_compile(mod, target, workdir: Path, deadline: float):
    """MetaSchedule-tune ``mod``'s kernels until the trial budget or ``deadline`` is spent; then compile.

    Returns the executable and what tuning did (trials planned, measurements kept, seconds). A worker
    process imports TVM (~30 s on a busy machine), hence the long builder timeout.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import (compile_relax, extract_tasks,
                                                           extracted_tasks_to_tune_contexts)

    import_tensor_intrinsics()  # before sharing out the time left: it can take minutes

    # Leave a fifth of what is left for worker start-up and the final build.
    tuning_s = max(0.0, deadline - time.monotonic()) * 0.8
    trials = max(_TRIALS_PER_ITER, int(tuning_s / SECONDS_PER_TRIAL))
    with tempfile.TemporaryDirectory(prefix="tvm-tuning-", dir=workdir) as logs:
        started = time.monotonic()
        # Tasks are the fused kernels: fuse as compile_relax will, so the tuning records match them.
        with target:
            fused = tvm.transform.Sequential(
                relax.pipeline.library_dispatch_passes(target) + relax.pipeline.legalize_passes(target))(mod)
        tasks = extract_tasks(fused, target)
        contexts, weights = extracted_tasks_to_tune_contexts(tasks, logs, seed=0)
        database = ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=logs, max_trials_global=trials,
            num_trials_per_iter=_TRIALS_PER_ITER,
            builder=ms.builder.LocalBuilder(timeout_sec=120, initializer=import_tensor_intrinsics),
            runner=ms.runner.LocalRunner(timeout_sec=60),
            measure_callbacks=[*ms.MeasureCallback.create("default"), _stop_at(time.monotonic() + tuning_s)],
        )
        tuning = {"tuning_trials": trials, "tuning_records": len(database),
                  "tuning_s": round(time.monotonic() - started, 1)}
        return compile_relax(database, mod, target, params=None), tuning


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics: tuning contexts and every build worker need them.

    The import parses hundreds of TVMScript functions (30 s on an idle core, minutes on a busy
    one). Build workers run it as their initializer, which no build timeout counts; otherwise a busy
    machine times every build out while the worker is still importing.
    """
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _stop_at(deadline: float):
    """A MetaSchedule measure callback that ends every task once ``deadline`` (monotonic) has passed."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class StopAtDeadline(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            if time.monotonic() < deadline:
                return
            for index in range(len(task_scheduler.tasks_)):
                try:
                    task_scheduler.terminate_task(index)
                except RuntimeError:  # TVM refuses to end a task that has already ended
                    continue

    return StopAtDeadline()


# --- serving --------------------------------------------------------------------------------------

class TvmSession:
    """A compiled TVM library behind the Session protocol.

    Thread-safe by one Relax VM per calling thread (``threading.local``): a VM keeps per-call state.
    TVM's worker pool is per calling thread too; ``intra_op_threads`` sizes each one.
    """

    engine = "tvm"

    def __init__(self, library, signature: Signature, shapes: Mapping[str, Sequence[int]], batch_rows: bool,
                 threads: int = 0) -> None:
        self._library = library
        self.signature = signature
        self.compiled_shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.batch_rows = batch_rows
        self._threads = threads
        self._local = threading.local()

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        arrays = [np.ascontiguousarray(inputs[s.name]) for s in self.signature.inputs]
        rows = self._rows(arrays)
        if rows is None:
            results = self._run_once(arrays)
        elif rows == 0:  # an empty batch: shapes from one row of zeros
            results = [r[:0] for r in self._run_once([np.zeros((1,) + a.shape[1:], a.dtype) for a in arrays])]
        else:
            per_row = [self._run_once([a[i:i + 1] for a in arrays]) for i in range(rows)]
            results = [np.concatenate(parts) for parts in zip(*per_row)]
        named = dict(zip(self.signature.output_names, results))
        return {name: named[name] for name in (outputs or named)}

    def _rows(self, arrays: Sequence[np.ndarray]) -> int | None:
        """None when the arrays have the compiled shapes; the batch size to run row by row otherwise."""
        if all(a.shape == self.compiled_shapes[s.name] for s, a in zip(self.signature.inputs, arrays)):
            return None
        for spec, array in zip(self.signature.inputs, arrays):
            want = self.compiled_shapes[spec.name]
            if not (self.batch_rows and array.ndim == len(want) and array.shape[1:] == want[1:]):
                allowed = f"[N,{','.join(map(str, want[1:]))}]" if self.batch_rows else str(list(want))
                raise InvalidInput(
                    f"input {spec.name!r}: this TVM build was compiled for shape {allowed}, got {list(array.shape)}"
                )
        batches = sorted({a.shape[0] for a in arrays})
        if len(batches) > 1:
            raise InvalidInput(f"inputs have batch sizes {batches}; every input needs the same batch size")
        return batches[0]

    def _run_once(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            if self._threads:
                tvm.get_global_func("runtime.config_threadpool")(_AFFINITY_BIG_CORES, self._threads)
            vm = self._local.vm = relax.VirtualMachine(self._library, tvm.cpu())
        return [r.numpy() for r in _as_list(vm["main"](*[tvm.runtime.tensor(a) for a in arrays]))]

    def close(self) -> None:
        self._local = threading.local()  # drops every thread's VM
        self._library = None


def load(artifact: ModelArtifact, options: RuntimeOptions) -> TvmSession:
    """Load the compiled library of ``artifact`` after checking it was built for this CPU.

    Raises UnsupportedFormat for a version that is not a TVM library or a non-CPU device, and
    ModelLoadError when the sidecar is unreadable, the library was built for another CPU, or TVM
    cannot load it.
    """
    if options.device not in ("auto", "cpu"):
        raise UnsupportedFormat(f"the TVM engine runs on the CPU only, not device {options.device!r}")
    if artifact.manifest.format != "tvm":
        raise UnsupportedFormat(
            f"the TVM engine serves libraries compiled by TVM, not {artifact.manifest.format} models; "
            f"compile one with `leanserve optimize ... --engines tvm`"
        )
    path = artifact.model_path
    sidecar = read_sidecar(path)
    built_for, here = str(sidecar["target"].get("mcpu", sidecar.get("host_cpu"))), host_cpu()
    if built_for != here:
        raise ModelLoadError(
            f"{path.name} was compiled by TVM for CPU {built_for!r}; this machine's CPU is {here!r}. "
            f"Code built for another CPU may crash (SIGILL): recompile it here with "
            f"`leanserve optimize ... --engines tvm`"
        )
    try:
        library = tvm.runtime.load_module(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"TVM {tvm.__version__} cannot load {path.name} (built with TVM {sidecar.get('tvm_version')}): "
            f"{_first_line(exc)}"
        ) from exc
    return TvmSession(library, artifact.signature, sidecar["compiled_shapes"], bool(sidecar.get("batch_rows")),
                      options.intra_op_threads)


def read_sidecar(library: Path) -> dict[str, Any]:
    """The ``.tvm.json`` beside ``library``; ModelLoadError when missing or lacking what loading needs."""
    path = tvm_sidecar(library)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data["target"], dict) or not isinstance(data["compiled_shapes"], dict):
            raise TypeError("target and compiled_shapes must be objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{library.name}: unreadable TVM sidecar {path.name} ({exc})") from exc
    return data


def _as_list(result) -> list:
    """A VM result as a list of tensors: one tensor, or a tuple of them."""
    return [result] if hasattr(result, "numpy") else list(result)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
