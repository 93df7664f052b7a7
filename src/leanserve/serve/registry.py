"""The loaded models: which versions of which models are live, kept in step with the repository.

The registry loads what each model's traffic settings (and version policy) ask for, warms each
version up before it takes traffic, swaps versions in and out without dropping requests, and keeps
serving the previous version when a new one fails to load. A background task polls the repository.

A loaded version is known by its manifest's digest, not its folder name: a folder replaced under the
same number is reloaded (or unloaded when the new one fails), never served with the old weights. The
routing table (weights over loaded versions, the shadow) is built when versions or traffic change, so
a request only draws a number and walks a tuple.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter

from leanserve.artifact import MANIFEST_FILE, ModelArtifact, Signature
from leanserve.config import ModelConfig, TrafficConfig
from leanserve.errors import LeanserveError, ModelLoadError, ModelNotFound, NotReady
from leanserve.repository import CONFIG_FILE, Repository, VersionRef, is_version_folder, parse_version, versions_to_load
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
        self._unservable: set[str] = set()  # models that should serve and have no ready version
        self.watch_errors = Counter("leanserve_watcher_errors", "Repository watch rounds that failed for a "
                                    "model folder (the watcher logs them and keeps polling)", ("model",),
                                    registry=metrics.registry)

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
        routes = entry.routes
        if len(routes) == 1:
            chosen = routes[0][0]
        else:  # the same draw as traffic.choose_version, over the table built by _rebuild_routes
            if routing_key is not None:
                point = zlib.crc32(routing_key.encode("utf-8")) % entry.total_weight
            else:
                point = random.random() * entry.total_weight
            chosen = routes[-1][0]
            for handle, upto in routes:
                if point < upto:
                    chosen = handle
                    break
        shadow = entry.shadow
        return chosen, (shadow if shadow is not chosen else None)

    def ready(self) -> bool:
        """True once the first sync is done and every model that should serve has a ready version
        (a health probe's question: kept to two lookups)."""
        return self.initial_load_done and not self._unservable

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
            self._unservable.discard(gone)
        for name in sorted(names):
            try:
                await self.sync_model(name)
            except Exception:  # one odd folder must not stop the others or later rounds; logged with its path
                self.watch_errors.labels(name).inc()
                log.exception("repository watch: model folder %s could not be synced; other models and later "
                              "rounds go on", self.repo.root / name)
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
            digests = dict(fingerprint[0]) if fingerprint else {}
            try:
                await self._reconcile(entry, available, digests, reload)
            finally:
                self._rebuild_routes(entry)

    async def _reconcile(self, entry: ModelEntry, available: list[int], digests: dict[int, str], reload: bool) -> None:
        for handle in entry.versions.values():
            handle.config = entry.config
        # a folder whose manifest changed is another model under the same number: retry it, reload it
        keep = {v for v in entry.failed if v in available and entry.failed_digest.get(v) == digests.get(v)}
        entry.failed = {v: why for v, why in entry.failed.items() if v in keep}
        entry.failed_digest = {v: d for v, d in entry.failed_digest.items() if v in keep}
        changed = {v for v, h in entry.versions.items() if v in available and h.digest != digests.get(v)}
        for version in sorted(changed):
            log.warning("model %s version %d was replaced on disk (manifest %s… -> %s…); reloading it", entry.name,
                        version, entry.versions[version].digest[:12], (digests.get(version) or "?")[:12])
        wanted = set() if entry.unloaded_by_admin else versions_to_load(self.repo, entry.name, entry.config, available)
        entry.should_serve = bool(wanted)
        targets = sorted(wanted | changed) if reload else sorted((wanted - set(entry.versions)) | changed)
        for version in targets:  # load first, so there is never a moment with nothing to serve
            if version in entry.failed and not reload:
                continue
            await self._load(entry, version)
        entry.fallback = None
        if wanted and not wanted & set(entry.versions):
            entry.fallback = await self._load_fallback(entry, available, wanted)
        keep_serving = (wanted & set(entry.versions)) | ({entry.fallback} if entry.fallback else set())
        for version in sorted(set(entry.versions) - keep_serving):
            # A version no longer wanted keeps serving until a wanted one is ready; one removed from disk
            # or replaced (and not reloaded) goes regardless.
            stale = version not in available or entry.versions[version].digest != digests.get(version)
            if keep_serving or stale:
                await self._unload(entry, version)

    async def _load_fallback(self, entry: ModelEntry, available: list[int], wanted: set[int]) -> int | None:
        """No wanted version could load: serve the newest loadable one that served before (or that a model
        without traffic settings would serve), so a broken new version never takes the model down."""
        candidates = (entry.config.traffic.ever_served() | set(self.repo.default_served(entry.name, entry.config, available)))
        for version in sorted((candidates & set(available)) - wanted, reverse=True):
            if version not in entry.versions and version not in entry.failed:
                await self._load(entry, version)
            if version in entry.versions:
                log.warning("model %s: no wanted version %s could load; version %d serves instead", entry.name,
                            sorted(wanted), version)
                return version
        return None

    def _rebuild_routes(self, entry: ModelEntry) -> None:
        """The routing table of one model from its traffic settings and loaded versions (and readiness)."""
        traffic = entry.config.traffic
        weighted = [(entry.versions[v], w) for v, w in sorted(traffic.version_weights().items()) if v in entry.versions]
        if not weighted and entry.versions:
            default = entry.fallback if entry.fallback in entry.versions else max(entry.versions)
            weighted = [(entry.versions[default], 1)]
        routes, upto = [], 0
        for handle, weight in weighted:
            upto += weight
            routes.append((handle, upto))
        entry.routes, entry.total_weight = tuple(routes), upto
        entry.shadow = entry.versions.get(traffic.shadow) if traffic.shadow else None
        if entry.should_serve and not entry.versions and not entry.unloaded_by_admin:
            self._unservable.add(entry.name)
        else:
            self._unservable.discard(entry.name)

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
            self._rebuild_routes(entry)

    async def admin_reload(self, name: str) -> None:
        """Reload every live version of a model (new settings, fresh sessions) without dropping requests."""
        self.entry(name)
        await self.sync_model(name, reload=True)

    def apply_traffic(self, name: str, traffic: TrafficConfig) -> None:
        """Use new traffic settings at once (they are persisted by the caller)."""
        entry = self.entry(name)
        entry.config = entry.config.replace(traffic=traffic)
        self._rebuild_routes(entry)

    # --- background watch and shutdown ------------------------------------------------------------

    def start_watching(self, interval_s: float) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(interval_s))

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception:  # e.g. the repository folder itself vanished: log, count, poll again
                self.watch_errors.labels("").inc()
                log.exception("repository watch of %s failed this round; polling goes on", self.repo.root)

    async def close(self) -> None:
        """Stop watching; drain and unload every version."""
        if self._watcher:
            self._watcher.cancel()
        for name in list(self.models):
            await self._unload_all(name)


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


def _fingerprint(folder: Path) -> tuple:
    """What changes when versions are added, removed or replaced (each version's manifest digest) or the
    config is rewritten: ``((version, digest), ...), config mtime``."""
    try:
        versions = []
        for item in os.scandir(folder):
            if is_version_folder(item.name):
                try:
                    data = (Path(item.path) / MANIFEST_FILE).read_bytes()
                except OSError:  # not a version (yet): Repository.versions skips it too
                    continue
                versions.append((int(item.name), hashlib.sha256(data).hexdigest()))
        config = folder / CONFIG_FILE
        return (tuple(sorted(versions)), config.stat().st_mtime_ns if config.exists() else 0)
    except OSError:
        return ()


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
