"""Starting a local Ray, or joining an existing cluster, for the Ray executor and Ray Serve.

Ray is an optional extra (``leanserve[ray]``) and imported only here and in the modules that run on it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from leanserve.errors import LeanserveError

INSTALL_HINT = "pip install 'leanserve[ray]'"
# Environment of every Ray worker leanserve starts: no ONNX Runtime telemetry.
WORKER_ENV = {"ORT_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0"}


class RayUnavailable(LeanserveError):
    """Ray is not installed, or the cluster given by --address cannot be reached."""


@dataclass
class RayCluster:
    """The Ray this process is connected to: its address, CPUs, how long joining took, and whether we
    started it (and so must stop it)."""

    address: str
    cpus: float
    start_s: float
    owned: bool

    def shutdown(self) -> None:
        """Disconnect; a Ray that this process started stops with it."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()


def import_ray():
    """The ``ray`` module; raises RayUnavailable naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"the Ray executor needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> RayCluster:
    """Join the cluster at ``address`` (``host:port`` of its GCS, ``ray://host:port`` or ``auto``), or
    start a local Ray with ``num_cpus`` (default: this machine's CPUs).

    Reuses a Ray this process already started. Raises RayUnavailable when Ray is missing or the cluster
    does not answer."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # the future default; silences a warning
    started = time.perf_counter()
    if address and address != "auto":
        _check_reachable(address)
    if ray.is_initialized():
        return RayCluster(_address(ray), _cpus(ray), 0.0, owned=False)
    patch_serve_for_protobuf7()
    runtime_env = {"env_vars": {**WORKER_ENV, "HOME": os.environ.get("HOME", "")},
                   "worker_process_setup_hook": f"{__name__}.patch_serve_for_protobuf7"}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
        else:
            with _ray_home():
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                         logging_level="WARNING", log_to_driver=False)
    except ConnectionError as exc:  # ray raises it for a cluster that stops answering while we join
        raise RayUnavailable(f"cannot join the Ray cluster at {address}: {exc}; check the address "
                             "(ray status on the head node prints it)") from exc
    return RayCluster(_address(ray), _cpus(ray), time.perf_counter() - started, owned=True)


def patch_serve_for_protobuf7() -> None:
    """Make Ray Serve's deployment configs readable under protobuf 7 (which leanserve requires).

    Ray Serve's controller turns each deployment's config from protobuf into a dict by asking every field
    for ``label``, which protobuf 7 removed (``is_repeated`` replaces it): every deployment then fails
    with AttributeError (Ray 2.60). This swaps in the same conversion using ``is_repeated``; it runs in
    this process and, as Ray's worker setup hook, in every Ray worker (the Serve controller included).
    A no-op under protobuf versions that still have ``label`` or without Ray Serve."""
    from google.protobuf.descriptor import FieldDescriptor

    if hasattr(FieldDescriptor, "label"):
        return
    try:
        from ray.serve._private import config
    except ImportError:
        return

    def proto_to_dict(proto) -> dict:
        data = {}
        for field, value in proto.ListFields():
            message = field.type == FieldDescriptor.TYPE_MESSAGE
            if field.is_repeated:
                data[field.name] = [proto_to_dict(v) for v in value] if message else list(value)
            else:
                data[field.name] = proto_to_dict(value) if message else value
        return data

    config._proto_to_dict = proto_to_dict


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with the address in the message, rather than after Ray's own long retries."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnavailable(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                             "'ray start --head' or leave out --address to run on a local Ray") from None


class _ray_home:
    """Run Ray's start with HOME pointing at a folder holding ``ray_bootstrap_config.yaml``.

    Ray's dashboard process reads ``~/ray_bootstrap_config.yaml`` at start; when it is missing it asks
    cloud metadata addresses (169.254.169.254 and others) which provider it runs on. A file saying
    ``provider: local`` stops that. It lives in a folder of ours rather than the user's HOME, where Ray
    Tune would take it as a sign of a launched cluster. Workers get the real HOME back (runtime_env)."""

    def __enter__(self) -> None:
        folder = Path(tempfile.gettempdir()) / f"leanserve-ray-home-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        config = folder / "ray_bootstrap_config.yaml"
        if not config.exists():
            config.write_text("provider: {type: local}\n")
        self._home = os.environ.get("HOME")
        os.environ["HOME"] = str(folder)

    def __exit__(self, *exc) -> None:
        if self._home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = self._home


def _address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def _cpus(ray) -> float:
    return float(ray.cluster_resources().get("CPU", 0))
