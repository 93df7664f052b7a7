"""Serving speed check (issues 3 and 15): leanserve under wrk, beside a bare ASGI handler, the
in-process engine and the issues' targets.

Builds a repository with real models in a temporary folder (the demo digits CNN, whose input is one
1x1x28x28 float image: the 784-float CNN; and MiniLM sentence embeddings), then:

1. The ceiling (issue 15; all that ``--quick``, i.e. ``make bench-quick``, runs): three servers started
   cold together, with defaults, measured from 5 s after ready: ``benchmarks/bare_server.py`` (orjson +
   ONNX Runtime inline, no validation), ``leanserve serve`` (monitoring at 100%, access log on), and
   leanserve with live explanation sampling on. Rounds alternate between them, 16 connections, JSON;
   the binary extension and gRPC (benchmarks/grpc_load.py) run on the default server in the same rounds.
   Targets: >= 75% of the bare handler, p99 <= 10 ms, >= 4000 req/s; binary >= JSON; the sampler costs
   <= 5% of throughput.
2. The rest (issue 3): CNN JSON at 32 connections with batching on and off (on >= 2x off), MiniLM at
   1/4/16/32 connections against the in-process engine at the server's mean batch size (>= 90% at
   saturation).

wrk runs with one load thread (benchmarks/wrk/post_bodies.lua POSTs prepared V2 bodies), so the other
core stays with the server. Prints the CPU first, the figures with PASS/FAIL per target, appends them to
benchmarks/RESULTS.md and writes JSON (``--out``). The exit status is 0 whatever the figures: benchmarks
inform, they do not gate.

    .venv/bin/python benchmarks/serve_bench.py [--duration 10] [--quick] [--only cnn|minilm] [--out FILE]

Needs wrk (``apt-get install wrk``) and, for MiniLM, the packages named in benchmarks/minilm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

import leanserve
from leanserve.dtypes import v2_datatype
from leanserve.serve.protocol.codec import array_to_bytes, encode_json_request

HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "wrk" / "post_bodies.lua"
LEANSERVE_CLI = Path(sys.executable).parent / "leanserve"
CNN, MINILM = "digits-cnn", "minilm"
SEQ_LEN = 64
DISTINCT_BODIES = 64  # requests rotate through this many different inputs
READY_TIMEOUT_S = 300.0
QUIET_CORES = 0.1  # more CPU than this from other processes during a run is reported as spoiling it


@dataclass(frozen=True)
class Workload:
    """A served model and a pool of real input rows for it (name -> array whose first axis is rows)."""

    model: str
    pool: dict[str, np.ndarray]

    def feed(self, rows: int, start: int = 0) -> dict[str, np.ndarray]:
        """``rows`` rows taken from the pool from ``start`` on, wrapping around."""
        size = len(next(iter(self.pool.values())))
        index = np.arange(start, start + rows) % size
        return {name: np.ascontiguousarray(array[index]) for name, array in self.pool.items()}


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured. Latencies in milliseconds."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


@dataclass
class Run:
    """One server measurement and, once measured, the in-process engine's figure beside it."""

    scenario: str
    model: str
    connections: int
    batching: bool
    wrk: WrkResult
    mean_batch: float
    compute_ms_per_batch: float
    other_cores: float  # CPU other processes used during the run, in cores: > 0.1 spoils the figures
    error_sample: str | None = None
    engine_batch: int = 0
    engine_rows_per_s: float = 0.0
    engine_other_cores: float = 0.0

    @property
    def engine_ratio(self) -> float:
        return self.wrk.requests_per_s / self.engine_rows_per_s if self.engine_rows_per_s else 0.0


@dataclass(frozen=True)
class Check:
    """One of the issue's targets and whether this run met it."""

    name: str
    figure: str
    target: str
    passed: bool


@dataclass(frozen=True)
class Options:
    """The benchmark's settings, resolved from the command line."""

    duration_s: int
    warmup_s: int
    engine_s: float
    cnn_epochs: int
    minilm_connections: tuple[int, ...]
    models: tuple[str, ...]
    threads: int
    out: Path
    quick: bool = False


# --- the machine ----------------------------------------------------------------------------------

def system_info() -> dict:
    """CPU model and vector extensions (from /proc/cpuinfo), core counts and library versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    import onnxruntime

    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "avx512_vnni": "avx512_vnni" in flags,
        "avx2": "avx2" in flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "leanserve": leanserve.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "unknown",
    }


def print_system(info: dict, opts: Options) -> None:
    """The machine and the settings, so the figures can be read against them."""
    print(f"CPU:          {info['cpu']}")
    print(f"              avx512_vnni: {'yes' if info['avx512_vnni'] else 'no'}, "
          f"avx2: {'yes' if info['avx2'] else 'no'}")
    print(f"cores:        {info['logical_cpus']} logical, {info['usable_cpus']} usable by this process")
    print(f"onnxruntime:  {info['onnxruntime']} ({', '.join(info['onnxruntime_providers'])})")
    print(f"leanserve:    {info['leanserve']}, numpy {info['numpy']}, Python {info['python']}, {info['wrk']}")
    print(f"settings:     {opts.duration_s} s per wrk run after {opts.warmup_s} s warm-up, 1 wrk thread, "
          f"intra_op_threads={opts.threads} (server and in-process engine)\n")


class OtherLoad:
    """CPU that processes other than this one, its finished children and ``pids`` use from now on.

    The figures only mean something on an otherwise quiet machine; this tells when it was not.
    Reads /proc/stat (busy time of every CPU) and /proc/PID/stat; Linux only.
    """

    _TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self._start = (time.perf_counter(), self._busy_s(), self._own_s())

    def cores(self) -> float:
        """Mean cores used by other processes since construction."""
        wall, busy, own = self._start
        return max(0.0, (self._busy_s() - busy) - (self._own_s() - own)) / (time.perf_counter() - wall)

    @classmethod
    def _busy_s(cls) -> float:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        return (user + nice + system + irq + softirq) / cls._TICKS

    def _own_s(self) -> float:
        times = os.times()
        total = times.user + times.system + times.children_user + times.children_system
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / self._TICKS  # utime, stime
        return total


# --- models and request bodies --------------------------------------------------------------------

def build_cnn(repo: leanserve.Repository, folder: Path, epochs: int) -> Workload:
    """Train the demo CNN briefly, export it, add it to ``repo``; the held-out images are the pool."""
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.from_torch import export

    x_train, x_test, y_train, _ = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=epochs, progress=False)
    path = folder / "digits_cnn.onnx"
    export(module, torch.from_numpy(x_test[:4]), path, input_names=["image"], output_names=["logits"])
    repo.add(path, CNN)
    return Workload(CNN, {"image": x_test[:DISTINCT_BODIES]})


def build_minilm(repo: leanserve.Repository, folder: Path) -> Workload:
    """Export MiniLM (seq len 64) with benchmarks/minilm.py, add it; tokenized sentences are the pool."""
    from minilm import SENTENCES, export_minilm_onnx, load_minilm, tokenize
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keep the report readable
    path = folder / "minilm.onnx"
    export_minilm_onnx(path, seq_len=SEQ_LEN)
    repo.add(path, MINILM)
    _, tokenizer = load_minilm()
    return Workload(MINILM, tokenize(tokenizer, SENTENCES, SEQ_LEN))


def build_repository(folder: Path, opts: Options) -> tuple[leanserve.Repository, dict[str, Workload]]:
    """A repository holding the selected models, each set to ``opts.threads`` engine threads."""
    repo = leanserve.Repository(folder / "repo")
    workloads = {}
    started = time.perf_counter()
    if CNN in opts.models:
        workloads[CNN] = build_cnn(repo, folder, opts.cnn_epochs)
    if MINILM in opts.models:
        workloads[MINILM] = build_minilm(repo, folder)
    for name in workloads:
        repo.update_config(name, runtime=leanserve.RuntimeOptions(intra_op_threads=opts.threads))
    print(f"built {', '.join(workloads)} in {time.perf_counter() - started:.0f} s\n")
    return repo, workloads


def binary_body(inputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """A V2 body using the binary tensor data extension both ways; returns it and its JSON header length."""
    blobs = [array_to_bytes(array) for array in inputs.values()]
    doc = {
        "inputs": [{"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(blob)}}
                   for (name, array), blob in zip(inputs.items(), blobs)],
        "parameters": {"binary_data_output": True},
    }
    head = orjson.dumps(doc)
    return head + b"".join(blobs), len(head)


def write_bodies(folder: Path, workload: Workload, binary: bool) -> Path:
    """Write one single-row request per pool row as N.body (and N.hlen for binary) for the wrk script."""
    folder.mkdir(parents=True)
    rows = len(next(iter(workload.pool.values())))
    for i in range(rows):
        inputs = workload.feed(1, start=i)
        if binary:
            body, head_len = binary_body(inputs)
            (folder / f"{i + 1}.hlen").write_text(str(head_len))
        else:
            body = encode_json_request(inputs)
        (folder / f"{i + 1}.body").write_bytes(body)
    return folder


# --- the server -----------------------------------------------------------------------------------

def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``leanserve serve`` as a subprocess on a free port; ``with`` waits until every model is ready
    and stops it with SIGTERM afterwards. Its log goes to ``log_path``."""

    def __init__(self, repo_root: Path, models: list[str], log_path: Path, extra: tuple[str, ...] = (),
                 grpc: bool = False, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.grpc_port = free_port() if grpc else 0
        self.models = models
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # defaults as a user meets them (monitoring at 100%, access log on: its lines go to the log file)
        command = command or [str(LEANSERVE_CLI), "serve", str(repo_root), "--port", str(self.port),
                              "--grpc-port", str(self.grpc_port), *extra]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_at = 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as response:
            return response.read().decode()

    def __enter__(self) -> Server:
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while paths:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = self.log_path.read_text(errors="replace")[-3000:]
                sys.exit(f"the server did not become ready (exit code {self.process.returncode}); log:\n{tail}")
            if http_status(self.url(paths[0])) == 200:
                paths.pop(0)
            else:
                time.sleep(0.05)
        self.ready_at = time.monotonic()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def http_status(url: str) -> int | None:
    """The status of a GET to ``url``, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def batch_totals(metrics_text: str, model: str) -> dict[str, float]:
    """Cumulative batch count, rows and engine seconds of ``model`` (all versions) from /metrics text."""
    wanted = {"leanserve_batch_size_sum": "rows", "leanserve_batch_size_count": "batches",
              "leanserve_compute_seconds_sum": "compute_s"}
    totals = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == model:
                totals[wanted[sample.name]] += sample.value
    return totals


# --- wrk ------------------------------------------------------------------------------------------

_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    value = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not value:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(value.group(1)) * _TO_MS[value.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Requests/s, p50/p99 and error counts from wrk's ``--latency`` report. Raises ValueError."""
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rate and p50 and p99 and total):
        raise ValueError(f"cannot read wrk's report:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests_per_s=float(rate.group(1)), p50_ms=_ms(p50.group(1)), p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)), non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, sockets.groups())) if sockets else 0,
    )


def run_wrk(url: str, bodies: Path, connections: int, duration_s: int) -> WrkResult:
    """Run wrk (1 thread) against ``url`` POSTing the bodies in ``bodies``; exits if wrk fails."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "10s",
               "-s", str(LUA_SCRIPT), url]
    done = subprocess.run(command, env={**os.environ, "WRK_BODY_DIR": str(bodies)},
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"wrk failed (exit code {done.returncode}):\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def error_sample(url: str, bodies: Path) -> str:
    """Send the first prepared body once and describe the answer, to show why responses failed."""
    headers = {"Content-Type": "application/json"}
    if (bodies / "1.hlen").exists():
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": (bodies / "1.hlen").read_text()}
    request = urllib.request.Request(url, data=(bodies / "1.body").read_bytes(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return f"a single request now gets {response.status}"
    except urllib.error.HTTPError as exc:
        return f"a single request now gets {exc.code}: {exc.read()[:300].decode(errors='replace')}"


def measure(server: Server, scenario: str, model: str, bodies: Path, connections: int, batching: bool,
            opts: Options) -> Run:
    """Warm up, then one measured wrk run; the batch figures are the /metrics difference across it."""
    url = server.url(f"/v2/models/{model}/infer")
    run_wrk(url, bodies, connections, opts.warmup_s)
    before = batch_totals(server.metrics(), model)
    other = OtherLoad((server.process.pid,))
    result = run_wrk(url, bodies, connections, opts.duration_s)
    other_cores = other.cores()
    after = batch_totals(server.metrics(), model)
    batches = after["batches"] - before["batches"]
    run = Run(scenario, model, connections, batching, result,
              mean_batch=(after["rows"] - before["rows"]) / batches if batches else 0.0,
              compute_ms_per_batch=1000 * (after["compute_s"] - before["compute_s"]) / batches if batches else 0.0,
              other_cores=other_cores)
    print(f"  {scenario:<22} c={connections:<3} {result.requests_per_s:9.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
          f"p99 {result.p99_ms:7.2f} ms  mean batch {run.mean_batch:5.2f}  other CPU {other_cores:.2f} cores")
    if result.non_2xx or result.socket_errors:
        run.error_sample = error_sample(url, bodies)
        print(f"  !! {result.non_2xx} non-2xx responses, {result.socket_errors} socket errors; {run.error_sample}")
    return run


def serve_runs(repo: leanserve.Repository, workloads: dict[str, Workload], folder: Path, opts: Options) -> list[Run]:
    """Every server measurement: one server for the batching-on runs, a restarted one for batching off."""
    bodies = {}
    if CNN in workloads:
        bodies["cnn json"] = write_bodies(folder / "bodies-cnn-json", workloads[CNN], binary=False)
        bodies["cnn binary"] = write_bodies(folder / "bodies-cnn-binary", workloads[CNN], binary=True)
    if MINILM in workloads:
        bodies["minilm json"] = write_bodies(folder / "bodies-minilm-json", workloads[MINILM], binary=False)
    runs = []
    print("server (batching on):")
    with Server(repo.root, list(workloads), folder / "server-batching-on.log") as server:
        if CNN in workloads:
            for scenario, connections in (("cnn json", 16), ("cnn binary", 16), ("cnn json", 32)):
                runs.append(measure(server, scenario, CNN, bodies[scenario], connections, True, opts))
        for connections in opts.minilm_connections if MINILM in workloads else ():
            runs.append(measure(server, "minilm json", MINILM, bodies["minilm json"], connections, True, opts))
    if CNN in workloads:
        repo.update_config(CNN, batching=leanserve.BatchingConfig(enabled=False))
        print("server restarted with CNN batching off:")
        with Server(repo.root, list(workloads), folder / "server-batching-off.log") as server:
            runs.append(measure(server, "cnn json", CNN, bodies["cnn json"], 32, False, opts))
    print()
    return runs


# --- the ceiling: leanserve beside a bare ASGI handler, in the same run ---------------------------

BARE_SERVER = HERE / "bare_server.py"
GRPC_LOAD = HERE / "grpc_load.py"
AFTER_READY_S = 5.0  # measured from this long after "ready", as a user would meet a freshly started server
SAMPLER_FLAGS = ("--explain-sample-interval", "1")  # live importance on, as often as its CPU budget allows


@dataclass
class CeilingFigures:
    """Per round figures of the ceiling comparison (req/s, p99 ms, server CPU microseconds per request)."""

    bare: list[WrkResult]
    default: list[WrkResult]
    sampler: list[WrkResult]
    binary: list[WrkResult]
    grpc: list[dict]
    cpu_us: dict[str, list[float]]
    sample_cpu_s: float = 0.0
    sampler_wall_s: float = 0.0


def grpc_bodies(folder: Path, workload: Workload) -> Path:
    """One serialized ModelInferRequest (raw tensor contents) per pool row, for grpc_load.py."""
    from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb

    folder.mkdir(parents=True)
    rows = len(next(iter(workload.pool.values())))
    for i in range(rows):
        request = pb.ModelInferRequest(model_name=workload.model)
        for name, array in workload.feed(1, start=i).items():
            request.inputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
            request.raw_input_contents.append(array_to_bytes(array))
        (folder / f"{i + 1}.pb").write_bytes(request.SerializeToString())
    return folder


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live children (the prediction log's writer, say)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for one in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_after_ready(server: Server) -> None:
    time.sleep(max(0.0, server.ready_at + AFTER_READY_S - time.monotonic()))


def timed_wrk(server: Server, model: str, bodies: Path, connections: int, duration_s: int) -> tuple[WrkResult, float]:
    """One wrk run and the server's CPU microseconds per request during it."""
    before = process_cpu_s(server.process.pid)
    result = run_wrk(server.url(f"/v2/models/{model}/infer"), bodies, connections, duration_s)
    spent = process_cpu_s(server.process.pid) - before
    return result, 1e6 * spent / max(1, result.requests)


def explain_cpu_s(server: Server) -> float:
    """CPU seconds the server's live importance samples took so far (its /metrics)."""
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.name == "leanserve_explain_cpu_seconds_total" and sample.labels.get("origin") == "sample":
                return sample.value
    return 0.0


def ceiling_runs(repo: leanserve.Repository, workload: Workload, folder: Path, opts: Options) -> CeilingFigures:
    """The digits CNN (a 1x1x28x28 float input: 784 values) on three servers started cold together: the
    bare handler, ``leanserve serve`` with defaults, and the same with live explanation sampling on.
    Rounds alternate between them (the order turning each round), 16 connections, JSON; then the
    binary extension and gRPC on the default server in the same rounds."""
    json_bodies = write_bodies(folder / "ceiling-json", workload, binary=False)
    binary_bodies = write_bodies(folder / "ceiling-binary", workload, binary=True)
    pb_bodies = grpc_bodies(folder / "ceiling-grpc", workload)
    model_file = repo.get(workload.model, repo.versions(workload.model)[-1]).model_path
    port = free_port()
    from leanserve.serve.loading import serving_threads

    threads = opts.threads or serving_threads()  # the bare handler runs ONNX Runtime as leanserve does
    bare_command = [sys.executable, str(BARE_SERVER), str(model_file), "--port", str(port), "--threads", str(threads)]
    figures = CeilingFigures([], [], [], [], [], {"bare": [], "default": [], "sampler": []})
    rounds = 3 if opts.quick else 5
    print(f"ceiling: bare ASGI handler, leanserve defaults, leanserve + live explanation sampling; "
          f"{rounds} rounds, measured from {AFTER_READY_S:g} s after ready; ONNX Runtime intra-op threads {threads} "
          f"in both (leanserve's default: the usable cores less one)")
    with Server(repo.root, [workload.model], folder / "ceiling-default.log", grpc=True) as default, \
            Server(repo.root, [workload.model], folder / "ceiling-sampler.log", extra=SAMPLER_FLAGS) as sampler:
        bare = Server(repo.root, [], folder / "ceiling-bare.log", command=bare_command)
        bare.port = port
        with bare:
            for server in (bare, default, sampler):
                wait_after_ready(server)
            sample_cpu_start, sampler_start = explain_cpu_s(sampler), time.monotonic()
            order = [("bare", bare, figures.bare), ("default", default, figures.default), ("sampler", sampler, figures.sampler)]
            for number in range(rounds):
                for label, server, results in order[number % 3:] + order[:number % 3]:
                    result, cpu_us = timed_wrk(server, workload.model, json_bodies, 16, opts.duration_s)
                    results.append(result)
                    figures.cpu_us[label].append(cpu_us)
                    print(f"  round {number + 1} {label:<8} JSON c=16 {result.requests_per_s:9.1f} req/s  p99 "
                          f"{result.p99_ms:7.2f} ms  server CPU {cpu_us:6.0f} us/request  non-2xx {result.non_2xx}")
                figures.binary.append(run_wrk(default.url(f"/v2/models/{workload.model}/infer"), binary_bodies, 16,
                                              opts.duration_s))
                figures.grpc.append(run_grpc(default, pb_bodies, 16, opts.duration_s))
                print(f"  round {number + 1} default  binary    {figures.binary[-1].requests_per_s:9.1f} req/s  p99 "
                      f"{figures.binary[-1].p99_ms:7.2f} ms;  gRPC {figures.grpc[-1]['requests_per_s']:9.1f} req/s  "
                      f"p99 {figures.grpc[-1]['p99_ms']:7.2f} ms  errors {figures.grpc[-1]['errors']}")
            figures.sample_cpu_s = explain_cpu_s(sampler) - sample_cpu_start
            figures.sampler_wall_s = time.monotonic() - sampler_start
    print()
    return figures


def run_grpc(server: Server, bodies: Path, connections: int, duration_s: int) -> dict:
    """grpc_load.py against the server's gRPC port (a separate process, like wrk)."""
    done = subprocess.run([sys.executable, str(GRPC_LOAD), f"127.0.0.1:{server.grpc_port}", str(bodies),
                           "--connections", str(connections), "--duration", str(duration_s)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"grpc_load failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(values) -> float:
    return float(np.median(values)) if len(values) else 0.0


def ceiling_checks(f: CeilingFigures) -> tuple[list[Check], list[str]]:
    """The issue's targets from the ceiling rounds, and the lines that go to RESULTS.md."""
    ratio = _median([d.requests_per_s / b.requests_per_s for d, b in zip(f.default, f.bare)])
    default_rps, bare_rps = _median([r.requests_per_s for r in f.default]), _median([r.requests_per_s for r in f.bare])
    p99 = _median([r.p99_ms for r in f.default])
    binary_rps = _median([r.requests_per_s for r in f.binary])
    grpc_rps, grpc_p99 = _median([g["requests_per_s"] for g in f.grpc]), _median([g["p99_ms"] for g in f.grpc])
    sampler_cost = 1 - _median([s.requests_per_s / d.requests_per_s for s, d in zip(f.sampler, f.default)])
    share = f.sample_cpu_s / f.sampler_wall_s if f.sampler_wall_s else 0.0
    spread = f"{min(r.requests_per_s for r in f.default):.0f}-{max(r.requests_per_s for r in f.default):.0f}"
    checks = [
        Check("CNN JSON c=16, defaults vs bare handler", f"{ratio:.0%} ({default_rps:.0f} vs {bare_rps:.0f} req/s)",
              ">= 75% of bare", ratio >= 0.75),
        Check("CNN JSON c=16, defaults, p99", f"{p99:.2f} ms", "<= 10 ms", p99 <= 10),
        Check("CNN JSON c=16, defaults, throughput", f"{default_rps:.0f} req/s (rounds {spread})", ">= 4000 req/s",
              default_rps >= 4000),
        Check("CNN binary extension vs JSON", f"{binary_rps:.0f} vs {default_rps:.0f} req/s", ">= JSON",
              binary_rps >= default_rps),
        Check("explanation sampler on, throughput cost", f"{sampler_cost:.1%} (sampling used {share:.1%} of a core)",
              "<= 5%", sampler_cost <= 0.05),
    ]
    cpu = {k: _median(v) for k, v in f.cpu_us.items()}
    lines = [f"{c.name}: {c.figure} (target {c.target}: {'PASS' if c.passed else 'FAIL'})" for c in checks]
    lines.append(f"gRPC c=16 (Python grpc.aio client on the same 2 cores): {grpc_rps:.0f} req/s, p99 {grpc_p99:.2f} ms")
    lines.append(f"server CPU per request (medians): bare {cpu['bare']:.0f} us, leanserve defaults {cpu['default']:.0f} us, "
                 f"with sampler {cpu['sampler']:.0f} us")
    lines.append(f"rounds: {len(f.default)}; medians of per-round figures; p99 from wrk")
    return checks, lines


# --- the in-process engine ------------------------------------------------------------------------

def engine_rows_per_s(model: leanserve.Model, workload: Workload, batch: int, seconds: float) -> float:
    """Rows/s of ``model.session.run`` on back-to-back batches of ``batch`` rows for ``seconds``."""
    feed = workload.feed(batch)
    model.session.run(feed)  # first run of a new shape allocates; keep it out of the figure
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        model.session.run(feed)
        runs += 1
    return batch * runs / elapsed


def measure_engine(repo: leanserve.Repository, workloads: dict[str, Workload], runs: list[Run], seconds: float) -> None:
    """Fill in each run's engine figure at its mean batch size (rounded), loading each model once."""
    print("in-process engine (same runtime settings, server stopped):")
    for name, workload in workloads.items():
        model = leanserve.load(name, repo=repo)
        figures: dict[int, tuple[float, float]] = {}  # batch -> (rows/s, other processes' cores)
        for run in (r for r in runs if r.model == name):
            batch = max(1, round(run.mean_batch))
            if batch not in figures:
                other = OtherLoad()
                rows_per_s = engine_rows_per_s(model, workload, batch, seconds)
                figures[batch] = rows_per_s, other.cores()
                print(f"  {name:<12} batch {batch:3d}: {rows_per_s:9.1f} rows/s  other CPU {figures[batch][1]:.2f} cores")
            run.engine_batch = batch
            run.engine_rows_per_s, run.engine_other_cores = figures[batch]
    print()


# --- targets and report ---------------------------------------------------------------------------

def find_run(runs: list[Run], scenario: str, connections: int, batching: bool = True) -> Run | None:
    return next((r for r in runs if (r.scenario, r.connections, r.batching) == (scenario, connections, batching)), None)


def build_checks(runs: list[Run]) -> list[Check]:
    """The issue's targets, for the runs that were made."""
    checks = []
    minilm = [r for r in runs if r.model == MINILM]
    if minilm:
        # Saturation: the most loaded run, where the queue never empties; the fastest run would flatter.
        top = max(minilm, key=lambda r: r.connections)
        checks.append(Check(f"MiniLM at saturation (c={top.connections})",
                            f"{top.engine_ratio:.0%} of engine ({top.wrk.requests_per_s:.0f} vs "
                            f"{top.engine_rows_per_s:.0f} rows/s, batch {top.engine_batch})",
                            ">= 90% of in-process engine", top.engine_ratio >= 0.9))
    on, off = find_run(runs, "cnn json", 32, True), find_run(runs, "cnn json", 32, False)
    if on and off:
        ratio = on.wrk.requests_per_s / off.wrk.requests_per_s if off.wrk.requests_per_s else 0.0
        checks.append(Check("CNN batching on vs off, 32 clients",
                            f"{ratio:.2f}x ({on.wrk.requests_per_s:.0f} vs {off.wrk.requests_per_s:.0f} req/s)",
                            ">= 2x", ratio >= 2))
    errors = sum(r.wrk.non_2xx + r.wrk.socket_errors for r in runs)
    checks.append(Check("every response 2xx", f"{errors} failed", "0", errors == 0))
    return checks


def print_tables(runs: list[Run], checks: list[Check]) -> None:
    """The runs side by side with the engine, then the targets with PASS/FAIL."""
    if not runs:
        return print_checks(checks)
    head = (f"{'scenario':<22} {'batching':<8} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>7} "
            f"{'batch':>6} {'ms/batch':>8} {'engine rows/s':>13} {'server/engine':>13} {'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r.scenario:<22} {'on' if r.batching else 'off':<8} {r.connections:>5} {r.wrk.requests_per_s:>9.1f} "
              f"{r.wrk.p50_ms:>8.2f} {r.wrk.p99_ms:>8.2f} {r.wrk.non_2xx + r.wrk.socket_errors:>7} "
              f"{r.mean_batch:>6.2f} {r.compute_ms_per_batch:>8.2f} {r.engine_rows_per_s:>13.1f} {r.engine_ratio:>13.0%} "
              f"{max(r.other_cores, r.engine_other_cores):>9.2f}")
    print("\n(batch: mean rows per engine call in the server; ms/batch: server engine time per batch;"
          " engine rows/s: ONNX Runtime in-process at that batch size, rounded;\n"
          " other CPU: cores used by unrelated processes during the server or engine run, the larger)\n")
    print_checks(checks)
    busiest = max(max(r.other_cores, r.engine_other_cores) for r in runs)
    if busiest > QUIET_CORES:
        print(f"\nWARNING: other processes used up to {busiest:.2f} cores during the measurements; "
              "rerun on a quiet machine before trusting these figures.")


def print_checks(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    figure_width = max(len(c.figure) for c in checks)
    for c in checks:
        print(f"{c.name:<{width}}  {c.figure:<{figure_width}}  target {c.target:<28} {'PASS' if c.passed else 'FAIL'}")
    print()


def write_json(path: Path, info: dict, opts: Options, runs: list[Run], checks: list[Check]) -> None:
    """Everything measured, as JSON at ``path``."""
    doc = {
        "system": info,
        "options": {**asdict(opts), "out": str(opts.out)},
        "runs": [{**asdict(r), "engine_ratio": r.engine_ratio} for r in runs],
        "checks": [asdict(c) for c in checks],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {path}")


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Options:
    """Command-line flags to Options; ``--quick`` shortens everything for a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="the regression guard only (make bench-quick, under 3 minutes): the digits CNN against the bare "
                             "handler, JSON/binary/gRPC and the explanation sampler; no MiniLM, no batching on/off")
    parser.add_argument("--only", choices=("cnn", "minilm"), help="benchmark one model only")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads, in the server and in-process (default 0: the server's "
                             "default, ONNX Runtime's own choice)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/serve_bench.json"), help="where to write the JSON")
    args = parser.parse_args(argv)
    duration = args.duration or (6 if args.quick else 10)
    if duration < 1:
        parser.error("--duration must be at least 1 second")
    models = {"cnn": (CNN,), "minilm": (MINILM,), None: (CNN, MINILM)}[args.only]
    if args.quick:
        models = (CNN,)
    return Options(duration_s=duration, warmup_s=1 if args.quick else 2, engine_s=max(1.0, duration / 2),
                   cnn_epochs=1 if args.quick else 3, minilm_connections=(1, 32) if args.quick else (1, 4, 16, 32),
                   models=models, threads=args.threads, out=args.out, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    """Build, serve, load, measure, compare; returns 0 (the figures, not the exit status, tell)."""
    opts = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("serve_bench needs wrk on PATH: apt-get install wrk (Debian/Ubuntu) or brew install wrk")
    from machine import print_header, record

    header = print_header("serve_bench" + (" --quick" if opts.quick else ""))
    info = system_info()
    print_system(info, opts)
    runs, checks, lines = [], [], []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        repo, workloads = build_repository(Path(tmp), opts)
        if CNN in workloads:
            ceiling_checks_, lines = ceiling_checks(ceiling_runs(repo, workloads[CNN], Path(tmp), opts))
            checks += ceiling_checks_
        if not opts.quick:
            runs = serve_runs(repo, workloads, Path(tmp), opts)
            measure_engine(repo, workloads, runs, opts.engine_s)
            checks += build_checks(runs)
    print_tables(runs, checks)
    if not opts.quick:
        lines += [f"{c.name}: {c.figure} (target {c.target}: {'PASS' if c.passed else 'FAIL'})" for c in build_checks(runs)]
    print("\n".join(lines))
    record(header, lines)
    write_json(opts.out, info, opts, runs, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
