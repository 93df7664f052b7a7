"""Loading a version to serve: the live version and model records the registry keeps (``LoadedVersion``,
``ModelEntry``), opening a version's engine sessions with the engine threads the machine allows,
warming them up before they take traffic, and draining a version out.

``VersionLoader`` is the loading half of ``registry.ModelRegistry``; the registry decides which versions
to load and routes requests over them.
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
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Signature
from leanserve.config import ModelConfig
from leanserve.errors import LeanserveError, ModelLoadError
from leanserve.repository import Repository, VersionRef
from leanserve.runtime import example_inputs, load_session
from leanserve.serve.batching import Batcher, batchable
from leanserve.serve.cache import ResponseCache
from leanserve.serve.metrics import ServerMetrics, VersionMetrics

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
    digest: str = ""  # the manifest's SHA-256 when it was loaded: the version's identity

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
    failed_digest: dict[int, str] = field(default_factory=dict)  # retried when the folder changes
    loading: set[int] = field(default_factory=set)
    unloaded_by_admin: bool = False
    fingerprint: tuple = ()
    should_serve: bool = False  # versions on disk that the settings want served
    fallback: int | None = None  # serves when no version the traffic names is loaded
    # (version, cumulative weight) over loaded versions, and the sum: rebuilt on every change
    routes: tuple[tuple[LoadedVersion, int], ...] = ()
    total_weight: int = 0
    shadow: LoadedVersion | None = None



class VersionLoader:
    """Loading and unloading of versions for ``ModelRegistry``, which supplies ``repo``, ``metrics``,
    ``drain_timeout_s``, ``models`` and ``_rebuild_routes``."""

    repo: Repository
    metrics: ServerMetrics
    drain_timeout_s: float
    models: dict[str, ModelEntry]

    async def _load(self, entry: ModelEntry, version: int) -> None:
        ref = VersionRef(entry.name, version)
        entry.loading.add(version)
        config = entry.config
        try:
            loop = asyncio.get_running_loop()
            artifact, sessions, digest = await loop.run_in_executor(None, self._load_blocking, ref, config)
        except (LeanserveError, OSError) as exc:
            entry.failed[version] = str(exc)
            entry.failed_digest[version] = _digest_or_empty(self.repo, ref)
            self.metrics.load_failures.labels(entry.name, str(version)).inc()
            log.error("model %s version %d failed to load and is skipped; serving %s: %s", entry.name, version,
                      sorted(v for v in entry.versions if v != version) or "nothing", exc)
            return
        finally:
            entry.loading.discard(version)
        metrics = self.metrics.for_version(entry.name, version)
        batcher = Batcher(sessions, config.batching, metrics, name=f"{entry.name}-{version}")
        cache = ResponseCache(config.cache.max_bytes) if config.cache.max_bytes else None
        old = entry.versions.get(version)
        entry.versions[version] = LoadedVersion(ref, artifact, batcher, metrics, config, cache,
                                                getattr(sessions[0], "request_inputs", None), digest)
        self._rebuild_routes(entry)
        entry.failed.pop(version, None)
        self.metrics.loaded.labels(entry.name, str(version)).set(1)
        log.info("model %s version %d ready (%s, %d instance(s), batching %s)", entry.name, version,
                 artifact.manifest.default_runtime, len(sessions), "on" if batchable(artifact.signature) and config.batching.enabled else "off")
        if old is not None:  # a reload: the new one already takes traffic, the old one drains
            await old.batcher.close(self.drain_timeout_s)

    def _load_blocking(self, ref: VersionRef, config: ModelConfig):
        digest = self.repo.manifest_digest(ref.name, ref.version)
        artifact = self.repo.get(ref.name, ref.version)  # verifies checksums
        if self.repo.manifest_digest(ref.name, ref.version) != digest:
            raise ModelLoadError("its folder was replaced while it loaded; the next poll loads the new one")
        runtime = config.runtime
        if runtime.performance_hint == "auto":  # engines that tune for one goal follow the serving mode
            batched = config.batching.enabled and batchable(artifact.signature)
            runtime = dataclasses.replace(runtime, performance_hint="throughput" if batched else "latency")
        if not runtime.intra_op_threads:
            heavy = artifact.size_bytes >= HEAVY_MODEL_BYTES
            threads = serving_threads(config.batching.instances, heavy=heavy)
            runtime = dataclasses.replace(runtime, intra_op_threads=threads)
            log.info("%s: %d engine thread(s) per instance (%s)", ref, threads,
                     "a heavy model: every usable core" if heavy else "the usable cores less the event loop's")
        sessions = [load_session(artifact, runtime) for _ in range(config.batching.instances)]
        if config.warmup:
            started = time.perf_counter()
            try:
                for session in sessions:
                    _warm_up(session, config)
            except Exception as exc:  # engines raise their own types; any failure means not servable
                raise ModelLoadError(f"warm-up run failed: {exc}") from exc
            log.info("warmed up %s in %.0f ms", ref, (time.perf_counter() - started) * 1000)
        return artifact, sessions, digest

    async def _unload(self, entry: ModelEntry, version: int) -> None:
        handle = entry.versions.pop(version, None)
        if handle is None:
            return
        self.metrics.loaded.labels(entry.name, str(version)).set(0)
        self._rebuild_routes(entry)
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


HEAVY_MODEL_BYTES = 8 << 20  # a version this large spends far longer in its engine than in the event loop


def serving_threads(instances: int = 1, heavy: bool = False) -> int:
    """Engine threads per instance when a version's settings leave it to the server: the usable cores
    less one, which the event loop needs (decoding, encoding, the network), shared among the instances.
    On 2 cores a second engine thread (ONNX Runtime's own default) fights the event loop for its core; a
    one-off run of the digits CNN served more with 1 engine thread than with 2 (not a benchmark line in
    benchmarks/RESULTS.md, so no figure is quoted).
    A ``heavy`` model (``HEAVY_MODEL_BYTES`` of files or more: a sentence encoder, an image backbone)
    gets every usable core: its batches take milliseconds of engine time against microseconds of event
    loop per request, so the loop's core sits mostly idle, and idle engine threads do not spin."""
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores if heavy else cores - 1) // max(1, instances))


def _digest_or_empty(repo: Repository, ref: VersionRef) -> str:
    try:
        return repo.manifest_digest(ref.name, ref.version)
    except OSError:
        return ""


def _warm_up(session, config: ModelConfig) -> None:
    """Run the engine once at batch 1 (and at the max batch when batching) so the first request is not slow."""
    sizes = [1]
    if config.batching.enabled and batchable(session.signature):
        sizes.append(config.batching.max_batch_size)
    for size in sizes:
        inputs = example_inputs(session.signature, batch_size=size)
        for _ in range(5):  # the first runs allocate and tune; five keep them out of live p99
            session.run(inputs)
