"""Closed-loop HTTP load on one inference URL: N connections each POSTing the same body back to back.

wrk when it is installed (one thread, a C event loop: the load generator costs the server little CPU),
else an in-process asyncio/httpx client, which needs far more CPU per request and so measures a slower
server than wrk would on the same machine. Used by the batching tuner (``leanserve tune``).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.errors import InvalidInput, LeanserveError

GENERATORS = ("wrk", "python")
REQUEST_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Sends the body named by LEANSERVE_LOAD_BODY; done() prints one machine-readable line (latencies in us),
# so nothing depends on the units wrk picks for its human report.
_WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("LEANSERVE_LOAD_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("leanserve-load %.0f %.0f %.1f %.1f %.0f\\n", summary.duration, summary.requests,
    latency:percentile(50), latency:percentile(99), e.status + e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured: completed requests per second, latency percentiles in ms, failures."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers, connection errors and timeouts


class OtherCpu:
    """Cores used by processes other than this one, its finished children and ``pids``, from construction
    until ``cores()``: load figures from a busy machine mean little, and this says when it was busy.
    Reads /proc (Linux); 0.0 elsewhere."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = (time.perf_counter(), self._busy_s(), self._ours_s())

    def cores(self) -> float:
        wall, busy, ours = self._start
        elapsed = time.perf_counter() - wall
        return max(0.0, (self._busy_s() - busy) - (self._ours_s() - ours)) / elapsed if elapsed > 0 else 0.0

    def _busy_s(self) -> float:
        try:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        except (OSError, ValueError):
            return 0.0
        return (user + nice + system + irq + softirq) / self._ticks

    def _ours_s(self) -> float:
        times = os.times()
        total = times.user + times.system + times.children_user + times.children_system
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self._ticks  # utime, stime
            except (OSError, ValueError, IndexError):
                pass  # not Linux, or the process is gone: counted as other load
        return total


def choose(load: str) -> str:
    """Resolve ``auto`` to wrk when it is on PATH, else python; check an explicit choice. Raises InvalidInput."""
    if load == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if load not in GENERATORS:
        raise InvalidInput(f"load generator {load!r}: expected auto, {' or '.join(GENERATORS)}")
    if load == "wrk" and not shutil.which("wrk"):
        raise InvalidInput("wrk is not installed (apt-get install wrk); use the in-process generator: --load python")
    return load


def die_with_parent() -> None:
    """In a child between fork and exec: have Linux send it SIGTERM when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def request_body(signature: Signature) -> bytes:
    """A one-row V2 JSON request of synthetic inputs for ``signature``."""
    from leanserve.runtime.compare import synthetic_inputs
    from leanserve.serve.protocol.codec import encode_json_request

    return encode_json_request(synthetic_inputs(signature, rows=1))


def run(generator: str, url: str, body_file: Path, connections: int, seconds: int) -> LoadResult:
    """POST ``body_file`` to ``url`` over ``connections`` connections for ``seconds`` with ``generator``."""
    if generator == "wrk":
        return _run_wrk(url, body_file, connections, seconds)
    return asyncio.run(_run_python(url, body_file.read_bytes(), connections, seconds))


def _run_wrk(url: str, body_file: Path, connections: int, seconds: int) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="leanserve-load-") as script:
        script.write(_WRK_SCRIPT)
        script.flush()
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", f"{REQUEST_TIMEOUT_S:.0f}s",
                   "-s", script.name, url]
        # Own session: a Ctrl-C goes to the caller alone, which ends wrk rather than reading a cut-short run.
        done = subprocess.run(command, env={**os.environ, "LEANSERVE_LOAD_BODY": str(body_file)},
                              capture_output=True, text=True, check=False, timeout=seconds + 60,
                              start_new_session=True, preexec_fn=die_with_parent)
    line = next((l for l in done.stdout.splitlines() if l.startswith("leanserve-load ")), None)
    if done.returncode != 0 or line is None:
        raise LeanserveError(f"wrk failed (exit status {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    duration_us, requests, p50_us, p99_us, errors = (float(v) for v in line.split()[1:])
    return LoadResult(requests / duration_us * 1e6 if duration_us else 0.0, p50_us / 1000, p99_us / 1000,
                      int(requests), int(errors))


async def _run_python(url: str, body: bytes, connections: int, seconds: int) -> LoadResult:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Content-Type": "application/json"}

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal errors
        while (started := time.perf_counter()) < deadline:
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, started + seconds) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    if not latencies:
        return LoadResult(0.0, 0.0, 0.0, 0, errors)
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return LoadResult(len(latencies) / elapsed, float(p50), float(p99), len(latencies) + errors, errors)
