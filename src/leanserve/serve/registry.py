"""The loaded models: which versions of which models are live, kept in step with the repository.

The registry loads what each model's traffic settings (and version policy) ask for, warms each
version up before it takes traffic, swaps versions in and out without dropping requests, and keeps
serving the previous version when a new one fails to load. A background task polls the repository.

A loaded version is known by its manifest's digest, not its folder name: a folder replaced under the
same number is reloaded (or unloaded when the new one fails), never served with the old weights. The
routing table (weights over loaded versions, the shadow) is built when versions or traffic change, so
a request only draws a number and walks a tuple. Loading, warming up and draining a version is
``loading.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import zlib
from pathlib import Path

from prometheus_client import Counter

from leanserve.artifact import MANIFEST_FILE
from leanserve.config import TrafficConfig
from leanserve.errors import LeanserveError, ModelNotFound, NotReady
from leanserve.repository import CONFIG_FILE, Repository, is_version_folder, parse_version, versions_to_load
from leanserve.serve.loading import LoadedVersion, ModelEntry, VersionLoader
from leanserve.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class ModelRegistry(VersionLoader):
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
