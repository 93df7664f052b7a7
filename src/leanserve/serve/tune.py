"""Batching tuner: measure candidate serving settings on a real server and pick the fastest within a p99 bound.

Each candidate (batching on or off, ``max_batch_size``, ``max_queue_delay_us``, engine instances, intra-op
threads) is served by one ``leanserve serve`` subprocess on a free loopback port and driven at several
concurrencies, by wrk when it is installed and otherwise by an in-process asyncio/httpx client. The
server serves a scratch repository that links the model's version folders, and its config is switched
between candidates through the admin API's reload; the model's own ``config.json`` is not touched until
``apply_candidate`` writes the winner, so an interrupted or failed run leaves it as it was. The candidates
and their grid are ``candidates.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from leanserve.config import ModelConfig, RolloutConfig
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.repository import Repository
from leanserve.serve import loadgen
from leanserve.serve.candidates import Candidate, default_grid, with_current
from leanserve.serve.settings import ADMIN_TOKEN_ENV

READY_TIMEOUT_S = 300.0
OTHER_CORES_WARN = 0.5


class TuneError(LeanserveError):
    """The tuner's server could not be started or stopped answering; the model's config is unchanged."""


@dataclass(frozen=True)
class TuneOptions:
    """What the tuner measures: the latency bound, the connection counts, seconds per measurement."""

    p99_ms: float
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: int = 5
    warmup_s: int = 1  # at the highest concurrency after each switch, not counted
    load: str = "auto"  # wrk, python, or auto (wrk when installed)

    def __post_init__(self) -> None:
        if not self.p99_ms > 0:
            raise InvalidInput(f"--p99-ms must be above 0, got {self.p99_ms}")
        if not isinstance(self.seconds, int) or self.seconds < 1:
            raise InvalidInput(f"--seconds must be a whole number >= 1, got {self.seconds!r}")
        if not isinstance(self.warmup_s, int) or self.warmup_s < 0:
            raise InvalidInput(f"warm-up seconds must be a whole number >= 0, got {self.warmup_s!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise InvalidInput("concurrency needs at least one connection count >= 1")
        object.__setattr__(self, "load", loadgen.choose(self.load))


@dataclass(frozen=True)
class Measurement:
    """One candidate at one concurrency. ``failure`` says why it was not measured (e.g. it did not load)."""

    candidate: Candidate
    concurrency: int
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    failure: str | None = None
    other_cores: float = 0.0  # CPU other processes used meanwhile: above OTHER_CORES_WARN the figures are suspect

    def within(self, p99_ms: float) -> bool:
        """True when it ran without a failed request and its p99 keeps the bound."""
        return self.failure is None and self.requests > 0 and self.errors == 0 and self.p99_ms <= p99_ms


@dataclass(frozen=True)
class TuneResult:
    """Every measurement of a run; ``best`` is the highest-throughput one within the bound (or None)."""

    model: str
    version: int
    options: TuneOptions
    current: Candidate
    measurements: tuple[Measurement, ...]

    @property
    def busiest_other_cores(self) -> float:
        """The most CPU other processes took during any measurement (0.0 when not measured)."""
        return max((m.other_cores for m in self.measurements), default=0.0)

    @property
    def best(self) -> Measurement | None:
        fits = [m for m in self.measurements if m.within(self.options.p99_ms)]
        return max(fits, key=lambda m: m.requests_per_s, default=None)


def tune(repo: Repository, name: str, options: TuneOptions, grid: Sequence[Candidate] | None = None, *,
         on_measurement: Callable[[Measurement], None] | None = None) -> TuneResult:
    """Measure the current setting and each of ``grid`` (default: ``default_grid()``) at every concurrency.

    Nothing is written to ``repo``. ``on_measurement`` is called after each measurement (progress). Raises
    ModelNotFound for an unknown model, TuneError when the server cannot start or stops answering.
    """
    config = repo.config(name)
    artifact = repo.get(name, verify=False)
    current = Candidate.of(config)
    candidates = with_current(default_grid() if grid is None else grid, current)
    body = loadgen.request_body(artifact.signature)
    measurements: list[Measurement] = []
    with _ScratchServer(repo, name, candidates[0].apply(_quiet(config))) as server:
        body_file = server.folder / "body.json"
        body_file.write_bytes(body)
        for index, candidate in enumerate(candidates):
            failure = server.switch(candidate.apply(_quiet(config))) if index else None
            if failure is None and options.warmup_s:
                loadgen.run(options.load, server.infer_url, body_file, max(options.concurrency), options.warmup_s)
            for connections in options.concurrency:
                if failure is None:
                    other = loadgen.OtherCpu((server.process.pid,))
                    load = loadgen.run(options.load, server.infer_url, body_file, connections, options.seconds)
                    server.check_alive()
                    measurement = Measurement(candidate, connections, load.requests_per_s, load.p50_ms, load.p99_ms,
                                              load.requests, load.errors, other_cores=other.cores())
                else:
                    measurement = Measurement(candidate, connections, failure=failure)
                measurements.append(measurement)
                if on_measurement:
                    on_measurement(measurement)
    return TuneResult(name, int(artifact.path.name), options, current, tuple(measurements))


def apply_candidate(repo: Repository, name: str, candidate: Candidate) -> bool:
    """Write ``candidate`` into the model's config (only batching and runtime threads change);
    returns False when the config already had it."""
    current = repo.config(name)
    wanted = candidate.apply(current)
    if wanted == current:
        return False
    repo.update_config(name, batching=wanted.batching, runtime=wanted.runtime)
    return True


def _quiet(config: ModelConfig) -> ModelConfig:
    """The scratch server's config: no rollout to drive and no alerts sent anywhere while it is hammered."""
    return config.replace(rollout=RolloutConfig(), alerts=dataclasses.replace(config.alerts, webhook_url=None))


class _ScratchServer:
    """``leanserve serve`` on a free loopback port over a scratch repository holding only ``name``: its
    version folders linked, its config our own. Candidates are switched with the admin API's reload."""

    def __init__(self, repo: Repository, name: str, config: ModelConfig) -> None:
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix="leanserve-tune-"))
        self.token = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        try:
            model_dir = self.folder / "repo" / name
            model_dir.mkdir(parents=True)
            for version in repo.versions(name):
                os.symlink((repo.root / name / str(version)).resolve(), model_dir / str(version), target_is_directory=True)
            self.scratch = Repository(self.folder / "repo", create=False)
            self.scratch.set_config(name, config)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/infer"

    def __enter__(self) -> _ScratchServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        import httpx

        command = [sys.executable, "-m", "leanserve.cli", "serve", str(self.scratch.root), "--port", str(self.port),
                   "--grpc-port", "0", "--no-access-log", "--no-monitor", "--poll-interval", "3600", "--drain-timeout", "5"]
        with open(self.folder / "server.log", "wb") as log:
            # Its own session: a Ctrl-C meant for the tuner must not stop the server mid-measurement (the tuner
            # stops it on the way out); the parent-death signal stops it should the tuner be killed outright.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, ADMIN_TOKEN_ENV: self.token}, start_new_session=True,
                                            preexec_fn=loadgen.die_with_parent)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for path in ("/v2/health/ready", f"/v2/models/{self.name}/ready"):
            while True:
                self.check_alive()
                try:
                    if httpx.get(self.url + path, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass  # still starting
                if time.monotonic() > deadline:
                    raise TuneError(f"the tuning server was not ready after {READY_TIMEOUT_S:.0f} s; its log:\n{self._log_tail()}")
                time.sleep(0.1)

    def switch(self, config: ModelConfig) -> str | None:
        """Reload the model with ``config``; returns why it failed to load, None when it serves with it."""
        import httpx

        self.scratch.set_config(self.name, config)
        try:
            response = httpx.post(f"{self.url}/v2/admin/models/{self.name}/reload", timeout=READY_TIMEOUT_S,
                                  headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as exc:
            self.check_alive(grace_s=2.0)  # a dying server refuses connections a moment before it is reaped
            raise TuneError(f"the tuning server did not answer a reload: {exc}") from exc
        if response.status_code != 200:
            raise TuneError(f"the tuning server refused a reload ({response.status_code}): {response.text[:300]}")
        failed = response.json().get("failed", {})
        return "; ".join(f"did not load: {why}" for why in failed.values()) or None

    def check_alive(self, grace_s: float = 0.0) -> None:
        """Raise TuneError (with the server's log) when the server process has exited (or exits within
        ``grace_s``)."""
        if self.process is None:
            return
        if grace_s:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_s)
        if self.process.poll() is not None:
            raise TuneError(f"the tuning server exited (status {self.process.returncode}); its log:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-3000:]

    def __exit__(self, *exc_info) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
