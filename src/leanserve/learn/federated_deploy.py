"""Real deployments of federated rounds: the ClientApp a Flower SuperNode runs, and the launcher of
``leanserve federate-client``.

A SuperNode on each device connects to the server's SuperLink (Flower's Fleet API) and runs
``client_app`` for every training message, reading the device's data from the ``data-path`` node config.
The client needs no model code: the model travels with each message (see ``federated_client``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from leanserve.errors import InvalidInput
from leanserve.learn.federated_client import DATA_PATH_KEY, build_client_app, node_data_path

# The component a Flower app names in its pyproject: clientapp = "leanserve.learn.federated_deploy:client_app".
client_app = build_client_app(node_data_path)


def supernode_command(server: str, data: Path, *, root_certificates: str | None = None,
                      clientappio_address: str | None = None) -> list[str]:
    """The ``flower-supernode`` command line that joins ``server`` (HOST:PORT) with ``data`` as its data."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"--server {server!r}: expected HOST:PORT, e.g. 10.0.0.5:9092")
    exe = shutil.which("flower-supernode", path=str(Path(sys.executable).parent)) or shutil.which("flower-supernode")
    if exe is None:
        raise InvalidInput("flower-supernode not found: install leanserve[federated]")
    command = [exe, "--superlink", server, "--node-config", f"{DATA_PATH_KEY}='{Path(data).resolve()}'"]
    command += ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    if clientappio_address:
        command += ["--clientappio-api-address", clientappio_address]
    return command


def run_client(server: str, data: Path, *, root_certificates: str | None = None) -> int:
    """Run a SuperNode in the foreground until it is stopped; returns its exit code."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.call(supernode_command(server, data, root_certificates=root_certificates), env=env)
