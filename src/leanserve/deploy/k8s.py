"""Run ``leanserve serve`` on Kubernetes as a KServe V2 runtime: a Dockerfile, a ``ClusterServingRuntime``
and an ``InferenceService``.

The manifests are built from typed objects, never from text templates: the Kubernetes client's core
classes (``V1Container``, ``V1Probe``, ...) for everything inside a pod, and two small frozen dataclasses
for the two KServe kinds. The KServe SDK would give typed classes for those too, but every release pins
``protobuf<7`` (leanserve needs ``>=7.35``) and it brings a whole model server with it; our two classes
hold only the fields we set. ``ApiClient().sanitize_for_serialization`` turns the lot into plain data.

Needs the ``k8s`` extra (``kubernetes``, ``pyyaml``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import yaml
from kubernetes.client import (
    ApiClient,
    V1Capabilities,
    V1Container,
    V1ContainerPort,
    V1EnvVar,
    V1HTTPGetAction,
    V1ObjectMeta,
    V1Probe,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecurityContext,
)
from kubernetes.utils import parse_quantity

from leanserve import __version__
from leanserve.deploy import bundle
from leanserve.errors import InvalidInput, LeanserveError

MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts a predictor's storageUri
HTTP_PORT = 8080  # KServe's convention for a runtime's HTTP port
GRPC_PORT = 8081
APP_UID = 1000  # numeric, so the kubelet can check runAsNonRoot
RUNTIME_NAME = "leanserve"
MODEL_FORMAT = "leanserve"  # a leanserve repository folder, whatever the formats of the versions in it
TORCH_CPU_PIN = "torch==2.13.0"  # the Makefile's TORCH_PIN; a test keeps the two equal
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https", "hdfs", "webhdfs", "oci", "hf")  # what KServe can fetch; no plain http

# Docker's image reference grammar: [registry[:port]/]path[:tag][@digest]
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Resources:
    """CPU and memory as Kubernetes quantities (``500m``, ``2``, ``1Gi``). No CPU limit by default: a
    throttled server hurts tail latency more than sharing a node does."""

    cpu_request: str = "1"
    memory_request: str = "1Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = "2Gi"

    def __post_init__(self) -> None:
        for kind in ("cpu", "memory"):
            request = _quantity(f"{kind} request", getattr(self, f"{kind}_request"))
            limit = getattr(self, f"{kind}_limit")
            if limit is not None and _quantity(f"{kind} limit", limit) < request:
                raise InvalidInput(f"{kind} limit {limit} is below the {kind} request {getattr(self, f'{kind}_request')}")

    def requirements(self) -> V1ResourceRequirements:
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v is not None}
        return V1ResourceRequirements(requests={"cpu": self.cpu_request, "memory": self.memory_request},
                                      limits=limits or None)


@dataclass(frozen=True)
class DeploySpec:
    """What to deploy: one InferenceService ``name`` serving a repository with the server in ``image``.

    ``storage_uri`` None: the repository is copied into the image. Otherwise KServe fetches it (``s3://``,
    ``gs://``, ``pvc://NAME/PATH``, ...) into ``/mnt/models`` before the server starts. ``extras`` are
    the leanserve extras the image installs (the engines the repository's versions need).
    Raises InvalidInput for a bad name, namespace, image or storage URI.
    """

    name: str
    image: str
    storage_uri: str | None = None
    namespace: str | None = None
    resources: Resources = field(default_factory=Resources)
    extras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace)):
            if value is not None and not _DNS_LABEL.match(value):
                raise InvalidInput(f"{what} {value!r}: use at most 63 lowercase letters, digits and '-', "
                                   "starting and ending with a letter or digit")
        if len(self.image) > 255 or not _IMAGE.match(self.image):
            raise InvalidInput(f"image {self.image!r} is not an image reference: expected "
                               "[REGISTRY/]NAME[:TAG][@sha256:DIGEST] with a lowercase NAME, e.g. ghcr.io/acme/leanserve:0.1.0")
        if self.storage_uri is not None:
            scheme, sep, rest = self.storage_uri.partition("://")
            if not sep or scheme not in STORAGE_SCHEMES or not rest.strip("/"):
                raise InvalidInput(f"storage URI {self.storage_uri!r}: expected one of "
                                   f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} followed by a location")

    @property
    def baked_in(self) -> bool:
        """True when the repository travels inside the image (no storage URI)."""
        return self.storage_uri is None


@dataclass(frozen=True)
class ClusterServingRuntime:
    """KServe's ``ClusterServingRuntime`` (serving.kserve.io/v1alpha1): how to run a model server, for every
    namespace. Only the fields leanserve sets."""

    metadata: V1ObjectMeta
    containers: tuple[V1Container, ...]
    model_formats: tuple[str, ...]
    protocol_versions: tuple[str, ...]
    pod_annotations: dict[str, str]

    def to_dict(self) -> dict:
        return {
            "apiVersion": "serving.kserve.io/v1alpha1",
            "kind": "ClusterServingRuntime",
            "metadata": self.metadata,
            "spec": {
                "annotations": self.pod_annotations,
                "supportedModelFormats": [{"name": f, "version": "1", "autoSelect": True} for f in self.model_formats],
                "protocolVersions": list(self.protocol_versions),
                "multiModel": False,
                "containers": list(self.containers),
            },
        }


@dataclass(frozen=True)
class InferenceService:
    """KServe's ``InferenceService`` (serving.kserve.io/v1beta1) with one predictor run by a named runtime."""

    metadata: V1ObjectMeta
    runtime: str
    model_format: str
    resources: V1ResourceRequirements
    storage_uri: str | None = None
    protocol_version: str = "v2"

    def to_dict(self) -> dict:
        model = {"modelFormat": {"name": self.model_format}, "runtime": self.runtime,
                 "protocolVersion": self.protocol_version, "resources": self.resources}
        if self.storage_uri is not None:
            model["storageUri"] = self.storage_uri
        return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": self.metadata, "spec": {"predictor": {"model": model}}}


def repository_extras(repo: Path) -> tuple[str, ...]:
    """The leanserve extras that serving every version in ``repo`` needs (``()`` for ONNX Runtime alone).

    Raises InvalidInput when ``repo`` is not a folder or holds no model version.
    """
    from leanserve.repository import Repository
    from leanserve.runtime import ENGINES

    if not repo.is_dir():
        raise InvalidInput(f"{repo}: no such repository folder (create one with 'leanserve import' or 'leanserve demo')")
    repository = Repository(repo, create=False)
    extras = set()
    found = False
    for name in repository.models():
        engine = repository.config(name).runtime.engine
        for version in repository.versions(name):
            found = True
            try:
                runtime = engine or repository.get(name, version, verify=False).manifest.default_runtime
            except LeanserveError as exc:
                raise InvalidInput(f"{repo}: {name}:{version} is unreadable ({exc})") from None
            extras.add(ENGINES.get(runtime, (None, None))[1])
    if not found:
        raise InvalidInput(f"{repo}: the repository holds no model version to serve (add one with 'leanserve import')")
    return tuple(sorted(e for e in extras if e))


# --- builders -----------------------------------------------------------------------------------------

def serve_args(spec: DeploySpec) -> list[str]:
    """The ``leanserve`` arguments the runtime container runs with."""
    args = ["serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)]
    if not spec.baked_in:
        # KServe mounts a fetched repository read-only: the prediction log goes to the container's /tmp
        args += ["--monitor-db", "/tmp/leanserve/predictions.db"]
    return args


def runtime_container(spec: DeploySpec) -> V1Container:
    """The server container: ports, V2 health probes, resources, a non-root security context."""
    def probe(path: str, period_s: int, failures: int) -> V1Probe:
        return V1Probe(http_get=V1HTTPGetAction(path=path, port=HTTP_PORT), period_seconds=period_s,
                       timeout_seconds=2, failure_threshold=failures)

    return V1Container(
        name="kserve-container",  # the name KServe looks for
        image=spec.image,
        command=["leanserve"],
        args=serve_args(spec),
        env=[V1EnvVar(name="ORT_DISABLE_TELEMETRY", value="1")],
        ports=[V1ContainerPort(name="http", container_port=HTTP_PORT, protocol="TCP"),
               V1ContainerPort(name="grpc", container_port=GRPC_PORT, protocol="TCP")],
        # the server answers /live as soon as it listens and /ready once every model is loaded and warm;
        # the startup probe gives a slow start two minutes before liveness may restart the pod
        startup_probe=probe("/v2/health/live", 2, 60),
        liveness_probe=probe("/v2/health/live", 10, 3),
        readiness_probe=probe("/v2/health/ready", 5, 3),
        resources=spec.resources.requirements(),
        security_context=V1SecurityContext(
            run_as_non_root=True, run_as_user=APP_UID, allow_privilege_escalation=False,
            capabilities=V1Capabilities(drop=["ALL"]), seccomp_profile=V1SeccompProfile(type="RuntimeDefault")),
    )


def serving_runtime(spec: DeploySpec) -> ClusterServingRuntime:
    """The ``ClusterServingRuntime`` named ``leanserve`` that runs ``spec.image``."""
    return ClusterServingRuntime(
        metadata=V1ObjectMeta(name=RUNTIME_NAME, labels={"app.kubernetes.io/name": "leanserve"}),
        containers=(runtime_container(spec),),
        model_formats=(MODEL_FORMAT,),
        protocol_versions=("v2", "grpc-v2"),
        pod_annotations={"prometheus.io/scrape": "true", "prometheus.io/port": str(HTTP_PORT),
                         "prometheus.io/path": "/metrics"},
    )


def inference_service(spec: DeploySpec) -> InferenceService:
    """The ``InferenceService`` that serves the repository with the leanserve runtime."""
    return InferenceService(
        metadata=V1ObjectMeta(
            name=spec.name, namespace=spec.namespace, labels={"app.kubernetes.io/name": "leanserve"},
            # a Knative (serverless) service may expose one port only; a plain Deployment exposes HTTP and gRPC
            annotations={"serving.kserve.io/deploymentMode": "RawDeployment"}),
        runtime=RUNTIME_NAME,
        model_format=MODEL_FORMAT,
        resources=spec.resources.requirements(),
        storage_uri=spec.storage_uri,
    )


def to_yaml(manifest: ClusterServingRuntime | InferenceService) -> str:
    """One manifest as YAML, via the Kubernetes client's serializer (camelCase keys, no None fields)."""
    with ApiClient() as client:
        return yaml.safe_dump(client.sanitize_for_serialization(manifest), sort_keys=False)


def install_command(wheels: str) -> str:
    """The Dockerfile's step that installs leanserve itself: from the wheels in ``wheels`` only, offline."""
    return f"pip install --no-index --find-links {wheels} --no-deps leanserve=={__version__}"


def dockerfile(spec: DeploySpec) -> str:
    """A Dockerfile for the server on python:3.11-slim: leanserve and the extras the repository needs (the
    CPU build of torch only when asked for), a non-root user, a health check on /v2/health/ready."""
    extras = f"[{','.join(spec.extras)}]" if spec.extras else ""
    lines = ["FROM python:3.11-slim",
             "ENV ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1",
             f"RUN useradd --uid {APP_UID} --create-home --shell /usr/sbin/nologin leanserve"]
    if "torch" in spec.extras:
        lines.append(f"RUN pip install --index-url {TORCH_CPU_INDEX} {TORCH_CPU_PIN}")
    lines += ["COPY wheels/ /tmp/wheels/",
              "# leanserve only from the bundle's wheel (no index can stand in for it), then its dependencies",
              f"RUN {install_command('/tmp/wheels')} \\",
              f'    && pip install --find-links /tmp/wheels "leanserve{extras}=={__version__}" && rm -rf /tmp/wheels']
    if spec.baked_in:
        lines.append(f"COPY --chown={APP_UID}:{APP_UID} models/ {MODEL_DIR}/")
    else:
        lines.append(f"RUN mkdir -p {MODEL_DIR} && chown {APP_UID}:{APP_UID} {MODEL_DIR}  # KServe mounts the repository here")
    ready = f"http://127.0.0.1:{HTTP_PORT}/v2/health/ready"
    cmd = ", ".join(f'"{a}"' for a in ["leanserve", "serve", MODEL_DIR, "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                                         "--grpc-port", str(GRPC_PORT)])
    lines += [f"USER {APP_UID}",
              f"EXPOSE {HTTP_PORT} {GRPC_PORT}",
              "HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \\",
              f'  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen(\'{ready}\', timeout=2)"]',
              f"CMD [{cmd}]"]
    return "\n".join(lines) + "\n"


# --- the bundle on disk -------------------------------------------------------------------------------

def write_bundle(spec: DeploySpec, repo: Path, out: Path) -> list[Path]:
    """Write the Dockerfile, both manifests, a wheel of leanserve in ``wheels/`` and (baked-in) the versions of
    ``repo`` a server would load, with their profiles, into the folder ``out`` (see ``bundle.write_bundle``:
    all or nothing, a user's other wheels kept). Raises InvalidInput when ``out`` is a file or holds files
    this command did not write, or when no leanserve wheel can be built or found (saying how to provide one).
    Returns the paths written, relative to ``out``.
    """
    texts = {"Dockerfile": dockerfile(spec), "clusterservingruntime.yaml": to_yaml(serving_runtime(spec)),
             "inferenceservice.yaml": to_yaml(inference_service(spec))}
    return bundle.write_bundle(out, texts, repo if spec.baked_in else None)


def _quantity(what: str, value: str) -> Decimal:
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise InvalidInput(f"{what} {value!r} is not a Kubernetes quantity (e.g. 500m or 2 for CPU, 512Mi or 4Gi "
                           "for memory)") from None
    if amount <= 0:
        raise InvalidInput(f"{what} {value!r} must be above zero")
    return amount
