"""``leanserve serve --executor ray``: every loaded version runs as a Ray Serve deployment.

The HTTP and gRPC front is the same server as ``leanserve serve`` (codec, validation, batcher with the
model's batching settings, traffic split, shadow, cache, metrics, monitoring, admin), in the process
that runs the command. Only its registry differs: ``RayModelRegistry`` deploys each version it loads as
a Ray Serve application of its own (``leanserve-MODEL-VERSION``) and hands the batcher sessions that send
each batch to that deployment's replicas through a DeploymentHandle. Ray Serve scales the replicas on
their ongoing requests (in-flight batches): its queue length.

Why not Ray Serve's own HTTP proxy in front: it answered about 220 requests/s here against some 3,900 for
a plain Starlette app, and it would need a second copy of the REST layer. The replicas are where the
work is, and they spread over the cluster's machines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, replace

from leanserve.errors import InvalidInput, Overloaded
from leanserve.repository import Repository, VersionRef
from leanserve.serve.loading import ModelEntry, _warm_up
from leanserve.serve.registry import ModelRegistry
from leanserve.serve.settings import ServerConfig

log = logging.getLogger(__name__)
APP_PREFIX = "leanserve-"


@dataclass(frozen=True)
class RayServeOptions:
    """How versions run on Ray Serve: a fixed replica count, or autoscaling between ``autoscale`` bounds
    on ongoing requests per replica; CPUs each replica asks (its engine gets as many threads)."""

    address: str | None = None  # None: start a local Ray
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    replica_cpus: float = 1.0
    target_ongoing_batches: float = 2.0  # per replica, before Ray Serve adds one

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidInput(f"--replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not (0 <= self.autoscale[0] <= self.autoscale[1] and self.autoscale[1] >= 1):
            raise InvalidInput(f"--autoscale {self.autoscale[0]}:{self.autoscale[1]}: expected MIN:MAX with 0 <= MIN <= MAX, MAX >= 1")

    @staticmethod
    def parse_autoscale(text: str) -> tuple[int, int]:
        """``"MIN:MAX"`` as a pair of replica counts."""
        low, sep, high = text.partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise InvalidInput(f"--autoscale {text!r}: expected MIN:MAX replicas, e.g. 1:4")
        return int(low), int(high)

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    def deployment_options(self, batching_instances: int) -> dict:
        """Ray Serve deployment options for one version."""
        slots = self.batch_slots(batching_instances)
        scale = ({"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1],
                                         "target_ongoing_requests": self.target_ongoing_batches}}
                 if self.autoscale else {"num_replicas": self.replicas})
        return {**scale, "ray_actor_options": {"num_cpus": self.replica_cpus}, "max_ongoing_requests": slots,
                "max_queued_requests": slots}

    def batch_slots(self, batching_instances: int) -> int:
        """Batches in flight at once for one version: enough to keep every replica busy (one running,
        one on its way) at the largest scale."""
        return max(batching_instances, int(self.target_ongoing_batches * self.max_replicas))


class VersionReplica:
    """One Ray Serve replica of a version: its engine session, warmed up, running whole batches."""

    def __init__(self, root: str, model: str, version: int, threads: int) -> None:
        from leanserve.runtime import load_session

        repo = Repository(root, create=False)
        config = repo.config(model)
        runtime = config.runtime
        if not runtime.intra_op_threads:  # engine default is every core: replicas would fight over them
            runtime = replace(runtime, intra_op_threads=threads)
        self.session = load_session(repo.get(model, version), runtime)
        if config.warmup:
            _warm_up(self.session, config)

    def infer(self, inputs, outputs=None):
        return self.session.run(inputs, outputs)


class RemoteSession:
    """A session whose ``run`` sends the batch to a version's deployment (the batcher calls it on a thread)."""

    engine = "ray-serve"

    def __init__(self, handle, signature) -> None:
        self.handle = handle
        self.signature = signature

    def run(self, inputs, outputs=None):
        from ray.serve.exceptions import BackPressureError

        try:
            return self.handle.infer.remote(inputs, outputs).result()
        except BackPressureError as exc:
            raise Overloaded(f"every replica is busy and the deployment's queue is full: {exc}") from None

    def close(self) -> None:
        """The deployment goes when the registry unloads the version, not per session."""


class RayModelRegistry(ModelRegistry):
    """The registry of ``leanserve serve``, with each version running as a Ray Serve deployment."""

    def __init__(self, repo: Repository, metrics, drain_timeout_s: float = 30.0,
                 options: RayServeOptions = RayServeOptions()) -> None:
        super().__init__(repo, metrics, drain_timeout_s)
        self.options = options

    def _load_blocking(self, ref: VersionRef, config):
        from ray import serve

        digest = self.repo.manifest_digest(ref.name, ref.version)  # the registry knows a version by it
        artifact = self.repo.get(ref.name, ref.version)  # verifies checksums before anything is deployed
        deployment = serve.deployment(VersionReplica, name=f"{ref.name}-{ref.version}").options(
            **self.options.deployment_options(config.batching.instances))
        threads = max(1, round(self.options.replica_cpus))
        # serve.run waits until every replica has loaded and warmed its session; a failure there comes
        # back as an error and the version is reported failed, as a local load failure is.
        handle = serve.run(deployment.bind(str(self.repo.root), ref.name, ref.version, threads),
                           name=app_name(ref), route_prefix=None)
        session = RemoteSession(handle, artifact.signature)
        return artifact, [session] * self.options.batch_slots(config.batching.instances), digest

    async def _unload(self, entry: ModelEntry, version: int) -> None:
        from ray import serve

        had = version in entry.versions
        await super()._unload(entry, version)
        if had:
            await asyncio.get_running_loop().run_in_executor(None, serve.delete, app_name(VersionRef(entry.name, version)))


def app_name(ref: VersionRef) -> str:
    """The Ray Serve application of a version."""
    return f"{APP_PREFIX}{ref.name}-{ref.version}"


def start_serve(options: RayServeOptions):
    """Start (or join) Ray and Ray Serve without its HTTP proxy; returns the RayCluster to shut down."""
    from leanserve.deploy.ray_cluster import connect

    cluster = connect(options.address)
    from ray import serve

    serve.start(proxy_location="Disabled")
    return cluster


def stop_serve(cluster) -> None:
    """Remove leanserve's applications and stop Serve and Ray when this process started them."""
    from ray import serve

    if cluster.owned:
        serve.shutdown()
    else:
        for name in serve.status().applications:
            if name.startswith(APP_PREFIX):
                serve.delete(name)
    cluster.shutdown()


def run_ray_server(config: ServerConfig, options: RayServeOptions) -> None:
    """``leanserve serve --executor ray``: serve until SIGINT/SIGTERM, then remove the deployments."""
    from leanserve.server import run_server

    cluster = start_serve(options)
    log.info("Ray at %s (%g CPUs, joined in %.1f s); versions run as Ray Serve deployments", cluster.address,
             cluster.cpus, cluster.start_s)
    try:
        run_server(config, registry_factory=functools.partial(RayModelRegistry, options=options))
    finally:
        stop_serve(cluster)
