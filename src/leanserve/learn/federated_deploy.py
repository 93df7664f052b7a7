"""Real deployments of federated rounds: the processes behind ``leanserve federate --listen`` (a Flower
SuperLink, and the app run on it) and ``leanserve federate-client`` (a Flower SuperNode).

The server side is Flower's supported deployment route: a ``flower-superlink`` process (one port carries
its Fleet API for the SuperNodes, its Control API for submitting runs and its Runtime API for the ServerApp
process it starts), then ``flwr run`` of the app project of ``federated_app``, streaming the ServerApp's
log until the run ends. Every child is stopped on the way out, on errors and Ctrl-C too. Flower's processes
get no telemetry, no update check and no dependency installation (``flower_env``), and a ``FLWR_HOME`` of
their own inside the federation's working folder, so nothing is left in ``~/.flwr``.

Flower's SuperLink accepts runs (code) from anyone who can reach its port; without Flower's enterprise
authentication nothing stops them. Listen on loopback or a trusted network only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from leanserve.errors import InvalidInput, LeanserveError
from leanserve.learn.federated_app import write_app_project
from leanserve.learn.federated_client import DATA_PATH_KEY, load_client_data

log = logging.getLogger(__name__)

NO_PHONING_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "ORT_DISABLE_TELEMETRY": "1"}
_CONNECTION = "leanserve"


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT`` (IPv6 hosts in brackets); InvalidInput naming ``flag`` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)


def flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment of Flower's processes: this one's, with telemetry, update checks and dependency
    installation off unless the user set them otherwise, this interpreter's scripts first on PATH (Flower
    starts its helpers by name), and ``FLWR_HOME`` when ``home`` is given."""
    env = {**NO_PHONING_HOME, **os.environ}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise InvalidInput(f"{name} not found: install leanserve[federated]")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` now (the OS's pick)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InvalidInput(f"--listen {host}:{port}: cannot listen there ({exc.strerror}); "
                               "is another federation or server using the port?") from None


def _reachable(host: str) -> str:
    """The address a local client dials for a server listening on ``host`` (wildcards become loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- the server: a SuperLink and the app run on it --------------------------------------------------------

def run_federation(listen: str, job_dir: Path, *, start_timeout_s: float = 60.0) -> None:
    """Start a SuperLink listening on ``listen`` (HOST:PORT), run the federation app whose job folder is
    ``job_dir`` on it, copy the ServerApp's log to stderr until the run ends, and stop every process.
    The outcome is left in ``job_dir`` (``federated_app.read_outcome``). Raises InvalidInput when the
    address is unusable or taken, LeanserveError when the SuperLink or the run could not start."""
    host, port = parse_address(listen, "--listen")
    if not _is_loopback(host):
        log.warning("the SuperLink on %s also accepts runs (code) from anyone who can reach it: "
                    "use a trusted network only", listen)
    work = job_dir / "flower"
    home = _flower_home(work / "home", f"{_reachable(host)}:{port}")
    app = write_app_project(work / "app", job_dir)
    with _superlink(host, port, home, work / "superlink.log", start_timeout_s):
        _flwr_run(app, home)


def _flower_home(home: Path, address: str) -> Path:
    """A FLWR_HOME whose Flower configuration names the SuperLink at ``address`` (plaintext) as the default."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{_CONNECTION}"\n\n'
                                      f'[superlink.{_CONNECTION}]\naddress = {json.dumps(address)}\ninsecure = true\n')
    return home


@contextmanager
def _superlink(host: str, port: int, home: Path, log_path: Path, start_timeout_s: float):
    _check_port_free(host, port)
    command = [_script("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        _wait_until_listening(process, _reachable(host).strip("[]"), port, log_path, start_timeout_s)
        log.info("SuperLink listening on %s:%d (log: %s)", host, port, log_path)
        yield process
    finally:
        stop_process(process, "SuperLink")


def _wait_until_listening(process: subprocess.Popen, host: str, port: int, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise LeanserveError(f"the Flower SuperLink exited with status {process.returncode} at start:\n"
                                 f"{_tail(log_path)}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise LeanserveError(f"the Flower SuperLink did not listen on port {port} within {timeout_s:g} s:\n"
                                     f"{_tail(log_path)}") from None
            time.sleep(0.2)


def _flwr_run(app: Path, home: Path) -> None:
    """``flwr run`` the app on the configured SuperLink and copy the run's streamed log to stderr until it ends."""
    command = [_script("flwr"), "run", str(app), _CONNECTION, "--stream"]
    process = subprocess.Popen(command, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace")
    last = deque(maxlen=20)
    try:
        for line in process.stdout:
            last.append(line)
            sys.stderr.write(line)
        process.wait()
    finally:
        stop_process(process, "flwr run")
    if process.returncode != 0:
        raise LeanserveError(f"`flwr run` failed with status {process.returncode}:\n{''.join(last)}")


def stop_process(process: subprocess.Popen, what: str, grace_s: float = 10.0) -> None:
    """Ask ``process`` to stop (SIGTERM), kill it after ``grace_s``, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %g s; killing it", what, process.pid, grace_s)
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(deque(path.read_text(errors="replace").splitlines(keepends=True), maxlen=lines))
    except OSError:
        return ""


# --- the client: a SuperNode ------------------------------------------------------------------------------

def supernode_command(server: str, data: Path, *, root_certificates: str | None = None,
                      runtime_port: int | None = None) -> list[str]:
    """The ``flower-supernode`` command line that joins ``server`` (HOST:PORT) with ``data`` as its data.
    ``runtime_port``: the loopback port of the SuperNode's own Runtime API, where its ClientApp processes
    connect (default: a free one, so that several SuperNodes can share a machine)."""
    parse_address(server, "--server")
    command = [_script("flower-supernode"), "--superlink", server,
               "--node-config", f"{DATA_PATH_KEY}={json.dumps(str(Path(data).resolve()))}",
               "--host", "127.0.0.1", "--port", str(runtime_port or free_port())]
    command += ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    return command


def run_client(server: str, data: Path, *, root_certificates: str | None = None, runtime_port: int | None = None) -> None:
    """Become a SuperNode of the federation at ``server`` (this process is replaced; it runs until stopped).
    Raises InvalidInput first when ``data`` is not usable training data."""
    load_client_data(data)
    command = supernode_command(server, data, root_certificates=root_certificates, runtime_port=runtime_port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, flower_env())
