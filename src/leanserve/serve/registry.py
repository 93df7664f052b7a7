"""The loaded models: which versions of which models are live, kept in step with the repository.

The registry loads what each model's version policy (and traffic settings) ask for, warms each
version up before it takes traffic, swaps versions in and out without dropping requests, and keeps
serving the previous version when a new one fails to load. A background task polls the repository.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import ModelConfig, TrafficConfig
from leanserve.errors import LeanserveError, ModelLoadError, ModelNotFound, NotReady
from leanserve.repository import CONFIG_FILE, Repository, VersionRef, parse_version
from leanserve.runtime import example_inputs, load_session
from leanserve.serve.batching import Batcher, batchable
from leanserve.serve.cache import ResponseCache
from leanserve.serve.metrics import ServerMetrics, VersionMetrics
from leanserve.traffic import choose_version

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class LoadedVersion:
    """One live version: its artifact, batcher, optional cache and metric children."""

    ref: VersionRef
    artifact: ModelArtifact
    batcher: Batcher
    metrics: VersionMetrics
    config: ModelConfig
    cache: ResponseCache | None = None
    # inputs a version reads from request parameters (a post-processed version's group), or None;
    # a session offers them as ``request_inputs(parameters, rows) -> {name: array}``
    request_inputs: Callable[[Mapping[str, Any], int], dict[str, np.ndarray]] | None = None

    @property
    def signature(self) -> Signature:
        return self.artifact.signature


@dataclass
class ModelEntry:
    """A model's live versions, its traffic settings and the versions that failed to load (with why)."""

    name: str
    config: ModelConfig = field(default_factory=ModelConfig)
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    unloaded_by_admin: bool = False
    fingerprint: tuple = ()


class ModelRegistry:
    """Live versions of every model in ``repo``."""

    def __init__(self, repo: Repository, metrics: ServerMetrics, drain_timeout_s: float = 30.0) -> None:
        self.repo = repo
        self.metrics = metrics
        self.drain_timeout_s = drain_timeout_s
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watcher: asyncio.Task | None = None
        self.initial_load_done = False

    # --- lookup on the request path ---------------------------------------------------------------

    def route(self, name: str, version: str | None, routing_key: str | None = None) -> tuple[LoadedVersion, LoadedVersion | None]:
        """The version that serves a request (and the shadow version that gets a copy, if any)."""
        entry = self.entry(name)
        if entry.unloaded_by_admin:
            raise NotReady(f"model {name!r} was unloaded by an admin; load it again with POST /v2/admin/models/{name}/load")
        if not entry.versions:
            reason = "; ".join(f"version {v}: {why}" for v, why in sorted(entry.failed.items()))
            raise NotReady(f"model {name!r} has no ready version" + (f" ({reason})" if reason else " yet"))
        if version:
            number = parse_version(version)
            chosen = entry.versions.get(number)
            if chosen is None:
                if number in entry.failed:
                    raise NotReady(f"version {number} of model {name!r} failed to load: {entry.failed[number]}")
                raise ModelNotFound(
                    f"version {number} of model {name!r} is not loaded; loaded versions: {', '.join(map(str, sorted(entry.versions)))}"
                )
            return chosen, None
        traffic = entry.config.traffic
        chosen = entry.versions[choose_version(traffic, list(entry.versions), routing_key)]
        shadow = entry.versions.get(traffic.shadow) if traffic.shadow else None
        return chosen, (shadow if shadow is not chosen else None)

    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}; served models: {', '.join(sorted(self.models)) or 'none'}")
        return entry

    # --- keeping in step with the repository ------------------------------------------------------

    async def sync(self) -> None:
        """Reconcile every model with the repository (load new versions, unload removed ones)."""
        names = set(self.repo.models())
        for gone in set(self.models) - names:
            await self._unload_all(gone, forget=True)
        for name in sorted(names):
            await self.sync_model(name)
        self.initial_load_done = True

    async def sync_model(self, name: str, *, reload: bool = False) -> None:
        """Bring one model's live versions in line with its policy, traffic and versions on disk."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self.models.setdefault(name, ModelEntry(name))
            fingerprint = _fingerprint(self.repo.root / name)
            if fingerprint == entry.fingerprint and not reload:
                return
            entry.fingerprint = fingerprint
            try:
                entry.config = self.repo.config(name)
                available = self.repo.versions(name)
            except LeanserveError as exc:
                log.error("model %s: cannot read its settings or versions: %s", name, exc)
                return
            for version, handle in entry.versions.items():
                handle.config = entry.config
            if entry.unloaded_by_admin:
                wanted: set[int] = set()
            else:
                wanted = _wanted_versions(entry.config, available)
            entry.failed = {v: why for v, why in entry.failed.items() if v in available}
            targets = sorted(wanted - set(entry.versions)) if not reload else sorted(wanted)
            for version in targets:  # load first, so there is never a moment with nothing to serve
                if version in entry.failed and not reload:
                    continue
                await self._load(entry, version)
            serving_wanted = bool(wanted & set(entry.versions))
            for version in sorted(set(entry.versions) - wanted):
                # A version the policy no longer wants keeps serving until a wanted one is ready;
                # one removed from disk goes regardless.
                if serving_wanted or version not in available:
                    await self._unload(entry, version)

    async def _load(self, entry: ModelEntry, version: int) -> None:
        ref = VersionRef(entry.name, version)
        entry.loading.add(version)
        config = entry.config
        try:
            loop = asyncio.get_running_loop()
            artifact, sessions = await loop.run_in_executor(None, self._load_blocking, ref, config)
        except (LeanserveError, OSError) as exc:
            entry.failed[version] = str(exc)
            self.metrics.load_failures.labels(entry.name, str(version)).inc()
            log.error("model %s version %d failed to load; still serving %s: %s", entry.name, version,
                      sorted(entry.versions) or "nothing", exc)
            return
        finally:
            entry.loading.discard(version)
        metrics = self.metrics.for_version(entry.name, version)
        batcher = Batcher(sessions, config.batching, metrics, name=f"{entry.name}-{version}")
        cache = ResponseCache(config.cache.max_bytes) if config.cache.max_bytes else None
        old = entry.versions.get(version)
        entry.versions[version] = LoadedVersion(ref, artifact, batcher, metrics, config, cache,
                                                getattr(sessions[0], "request_inputs", None))
        entry.failed.pop(version, None)
        self.metrics.loaded.labels(entry.name, str(version)).set(1)
        log.info("model %s version %d ready (%s, %d instance(s), batching %s)", entry.name, version,
                 artifact.manifest.default_runtime, len(sessions), "on" if batchable(artifact.signature) and config.batching.enabled else "off")
        if old is not None:  # a reload: the new one already takes traffic, the old one drains
            await old.batcher.close(self.drain_timeout_s)

    def _load_blocking(self, ref: VersionRef, config: ModelConfig):
        artifact = self.repo.get(ref.name, ref.version)  # verifies checksums
        runtime = config.runtime
        if runtime.performance_hint == "auto":  # engines that tune for one goal follow the serving mode
            batched = config.batching.enabled and batchable(artifact.signature)
            runtime = dataclasses.replace(runtime, performance_hint="throughput" if batched else "latency")
        sessions = [load_session(artifact, runtime) for _ in range(config.batching.instances)]
        if config.warmup:
            started = time.perf_counter()
            try:
                for session in sessions:
                    _warm_up(session, config)
            except Exception as exc:  # engines raise their own types; any failure means not servable
                raise ModelLoadError(f"warm-up run failed: {exc}") from exc
            log.info("warmed up %s in %.0f ms", ref, (time.perf_counter() - started) * 1000)
        return artifact, sessions

    async def _unload(self, entry: ModelEntry, version: int) -> None:
        handle = entry.versions.pop(version, None)
        if handle is None:
            return
        self.metrics.loaded.labels(entry.name, str(version)).set(0)
        await handle.batcher.close(self.drain_timeout_s)
        log.info("model %s version %d unloaded", entry.name, version)

    async def _unload_all(self, name: str, *, forget: bool = False) -> None:
        entry = self.models.get(name)
        if entry is None:
            return
        for version in list(entry.versions):
            await self._unload(entry, version)
        if forget:
            self.models.pop(name, None)

    # --- admin ------------------------------------------------------------------------------------

    async def admin_load(self, name: str) -> None:
        """Serve a model again after an admin unload (per its policy)."""
        self.repo.versions(name)  # raises ModelNotFound
        entry = self.models.setdefault(name, ModelEntry(name))
        entry.unloaded_by_admin = False
        entry.fingerprint = ()
        await self.sync_model(name)

    async def admin_unload(self, name: str) -> None:
        """Stop serving a model until it is loaded again; its versions drain first."""
        entry = self.entry(name)
        entry.unloaded_by_admin = True
        async with self._locks.setdefault(name, asyncio.Lock()):
            for version in list(entry.versions):
                await self._unload(entry, version)

    async def admin_reload(self, name: str) -> None:
        """Reload every live version of a model (new settings, fresh sessions) without dropping requests."""
        self.entry(name)
        await self.sync_model(name, reload=True)

    def apply_traffic(self, name: str, traffic: TrafficConfig) -> None:
        """Use new traffic settings at once (they are persisted by the caller)."""
        entry = self.entry(name)
        entry.config = entry.config.replace(traffic=traffic)

    # --- background watch and shutdown ------------------------------------------------------------

    def start_watching(self, interval_s: float) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(interval_s))

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except (LeanserveError, OSError) as exc:
                log.error("repository watch failed this round: %s", exc)

    async def close(self) -> None:
        """Stop watching; drain and unload every version."""
        if self._watcher:
            self._watcher.cancel()
        for name in list(self.models):
            await self._unload_all(name)


def _wanted_versions(config: ModelConfig, available: list[int]) -> set[int]:
    wanted = set(config.version_policy.select(available))
    pinned = set(config.traffic.version_weights()) | ({config.traffic.shadow} if config.traffic.shadow else set())
    return wanted | (pinned & set(available))


def _fingerprint(folder: Path) -> tuple:
    """What changes when versions are added/removed or the config is rewritten."""
    try:
        entries = sorted(e.name for e in os.scandir(folder) if e.name.isdigit())
        config = folder / CONFIG_FILE
        return (tuple(entries), config.stat().st_mtime_ns if config.exists() else 0)
    except OSError:
        return ()


def _warm_up(session, config: ModelConfig) -> None:
    """Run the engine once at batch 1 (and at the max batch when batching) so the first request is not slow."""
    sizes = [1]
    if config.batching.enabled and batchable(session.signature):
        sizes.append(config.batching.max_batch_size)
    for size in sizes:
        inputs = example_inputs(session.signature, batch_size=size)
        for _ in range(5):  # the first runs allocate and tune; five keep them out of live p99
            session.run(inputs)
