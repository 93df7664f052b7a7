"""Real deployments of federated rounds: the processes behind ``leanserve federate --listen`` (a Flower
SuperLink, and the app run on it) and ``leanserve federate-client`` (a Flower SuperNode).

The server side is Flower's supported deployment route, fenced in: a ``flower-superlink`` process (one HTTP
API carries its Fleet API for the SuperNodes, its Control API for submitting runs and its Runtime API for the
ServerApp process it starts), then ``flwr run`` of the app project of ``app``, streaming the
ServerApp's log until the run ends. The SuperLink listens only on a Unix socket in a folder only this user
can enter (``socket_patch``), in TLS with a certificate of its own (``keys``); the address the user asked for
is served by ``proxy``, which forwards the Fleet API and refuses everything else. So no port this opens
accepts a run (code) from anyone. With authorized keys, the SuperLink runs Flower's SuperNode authentication
and the keys are registered through its Control API on the socket before the public port opens.

Every Flower process is started in a session (process group) of its own and is stopped, with all its
descendants, on the way out (``processes``): on normal exit, on errors, on Ctrl-C and on SIGTERM. Flower's
processes get no telemetry, no update check and no dependency installation (``flower_env``), and a
``FLWR_HOME`` of their own inside the federation's working folder, so nothing is left in ``~/.flwr``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from leanserve.errors import InvalidInput, LeanserveError
from leanserve.learn.federated.app import write_app_project
from leanserve.learn.federated.client import DATA_PATH_KEY, load_client_data
from leanserve.learn.federated.keys import SUPERLINK_HOST, AuthorizedKeys, check_private_key, superlink_certificate
from leanserve.learn.federated.processes import ProcessTree, stopped_on_sigterm
from leanserve.learn.federated.proxy import FleetFront, TlsFiles
from leanserve.learn.federated.socket_patch import SOCKET_ENV, sitecustomize_source

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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- the server: a SuperLink behind the Fleet-only front, and the app run on it -------------------------------

def run_federation(listen: str, job_dir: Path, *, tls: TlsFiles | None = None,
                   authorized_keys: AuthorizedKeys | None = None, start_timeout_s: float = 60.0) -> None:
    """Serve Flower's Fleet API on ``listen`` (HOST:PORT; TLS with ``tls``) in front of a SuperLink on a
    private Unix socket, run the federation app whose job folder is ``job_dir`` on it, copy the ServerApp's
    log to stderr until the run ends, and stop every process. With ``authorized_keys`` (which needs ``tls``)
    only SuperNodes holding one of those keys may join. The outcome is left in ``job_dir``
    (``app.read_outcome``). Raises InvalidInput when the address is unusable or taken, or keys come without
    TLS, LeanserveError when the SuperLink, the keys' registration or the run failed, Terminated on SIGTERM."""
    host, port = parse_address(listen, "--listen")
    if authorized_keys is not None and tls is None:
        raise InvalidInput("--authorized-keys: needs --tls-cert and --tls-key (Flower's SuperNode authentication "
                           "runs only over TLS)")
    if not _is_loopback(host) and tls is None:
        log.warning("the Fleet API on %s is plaintext: model updates cross the network unencrypted "
                    "(give --tls-cert and --tls-key)", listen)
    public = _bind_public(host, port)
    try:
        work = _private_folder(job_dir / "flower")
        sock_path = _socket_path(work)
        certs = superlink_certificate(_private_folder(work / "tls"))
        env = _superlink_env(work, sock_path, certs / "cert.pem")
        app = write_app_project(work / "app", job_dir)
        with stopped_on_sigterm(), ProcessTree() as tree:
            _start_superlink(tree, env, sock_path, certs, work / "superlink.log", start_timeout_s,
                             supernode_auth=authorized_keys is not None)
            if authorized_keys is not None:
                _register_keys(tree, env, authorized_keys, _private_folder(work / "keys"))
            front = FleetFront(public, sock_path, certs / "cert.pem", tls)
            front.start()
            log.info("Fleet API on %s%s%s (the SuperLink itself: %s)", listen, " (TLS)" if tls else "",
                     f", {len(authorized_keys.keys)} SuperNode key(s) authorized" if authorized_keys else "", sock_path)
            try:
                _flwr_run(tree, app, env)
            finally:
                front.stop()
    finally:
        public.close()


def _bind_public(host: str, port: int) -> socket.socket:
    """The listening socket of the public port, bound now so that a taken port fails before Flower starts."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"--listen {host}:{port}: cannot listen there ({exc.strerror}); "
                           "is another federation or server using the port?") from None
    sock.set_inheritable(False)
    return sock


def _private_folder(folder: Path) -> Path:
    """``folder``, created if needed, that only this user may enter (0700), with every parent's check done:
    the SuperLink's socket inside it is then reachable by this user alone."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, stat.S_IRWXU)
    return folder


def _socket_path(work: Path) -> Path:
    path = work / "superlink.sock"
    if len(os.fsencode(path)) > 100:  # sockaddr_un holds 108 bytes with its terminator
        raise InvalidInput(f"the federation's working folder {work} is too long a path for a Unix socket; "
                           "set TMPDIR to a shorter folder")
    return path


def _superlink_env(work: Path, sock_path: Path, superlink_ca: Path) -> dict[str, str]:
    """The environment of every server-side Flower process: ``flower_env`` plus ``socket_patch``'s
    patch, loaded by a ``sitecustomize`` on PYTHONPATH, pointing them all at ``sock_path``, and a Flower
    configuration that trusts ``superlink_ca``."""
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(sitecustomize_source())
    home = _flower_home(work / "home", f"{SUPERLINK_HOST}:{_NOWHERE_PORT}", superlink_ca)
    env = flower_env(home)
    env[SOCKET_ENV] = str(sock_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    # Flower's legacy gRPC Control and Fleet servers listen on TCP ports of their own: keep them off.
    env["FLWR_INTERNAL_GRPC_CONTROL_API"] = env["FLWR_INTERNAL_GRPC_FLEET_API"] = "0"
    return env


# The TCP port Flower's programs are told (they insist on one); nothing binds or dials it, the socket serves.
_NOWHERE_PORT = 9093


def _flower_home(home: Path, address: str, root_certificates: Path) -> Path:
    """A FLWR_HOME whose Flower configuration names the SuperLink at ``address`` (TLS, trusting
    ``root_certificates``) as the default."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{_CONNECTION}"\n\n'
                                      f'[superlink.{_CONNECTION}]\naddress = {json.dumps(address)}\n'
                                      f'root-certificates = {json.dumps(str(root_certificates))}\n')
    return home


def _start_superlink(tree: ProcessTree, env: dict[str, str], sock_path: Path, certs: Path, log_path: Path,
                     start_timeout_s: float, *, supernode_auth: bool) -> subprocess.Popen:
    """``flower-superlink`` on the socket, in TLS with the certificate in ``certs`` (Flower refuses SuperNode
    authentication with ``--insecure``; one configuration serves both cases)."""
    cert, key = str(certs / "cert.pem"), str(certs / "key.pem")
    command = [_script("flower-superlink"), "--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certfile", cert,
               "--host", SUPERLINK_HOST, "--port", str(_NOWHERE_PORT), "--disable-runtime-dependency-installation"]
    command += ["--enable-supernode-auth"] if supernode_auth else []
    with log_path.open("wb") as out:
        process = tree.start(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    _wait_for_socket(process, sock_path, log_path, start_timeout_s)
    if stat.S_IMODE(sock_path.parent.stat().st_mode) != stat.S_IRWXU:
        raise LeanserveError(f"{sock_path.parent} is no longer private (0700); refusing to run")
    return process


def _wait_for_socket(process: subprocess.Popen, path: Path, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise LeanserveError(f"the Flower SuperLink exited with status {process.returncode} at start:\n"
                                 f"{_tail(log_path)}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise LeanserveError(f"the Flower SuperLink did not listen on {path} within {timeout_s:g} s:\n"
                                     f"{_tail(log_path)}") from None
            time.sleep(0.2)


def _register_keys(tree: ProcessTree, env: dict[str, str], authorized: AuthorizedKeys, folder: Path,
                   timeout_s: float = 120.0) -> None:
    """Register each authorized key with the SuperLink (``flwr supernode register``, through its Control API
    on the socket: Flower's CLI reads one key per file). Raises LeanserveError with Flower's words on failure."""
    for number, key in enumerate(authorized.keys, 1):
        path = folder / f"supernode-{number}.pub"
        path.write_text(key + "\n")
        process = tree.start([_script("flwr"), "supernode", "register", str(path), _CONNECTION], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            out, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        if process.returncode != 0:
            raise LeanserveError(f"registering key {number} of --authorized-keys {authorized.path} with the SuperLink "
                                 f"failed (status {process.returncode}):\n{out[-2000:]}")
    log.info("registered %d SuperNode key(s) from %s", len(authorized.keys), authorized.path)


def _flwr_run(tree: ProcessTree, app: Path, env: dict[str, str]) -> None:
    """``flwr run`` the app on the configured SuperLink and copy the run's streamed log to stderr until it ends."""
    command = [_script("flwr"), "run", str(app), _CONNECTION, "--stream"]
    process = tree.start(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace")
    last = deque(maxlen=20)
    try:
        for line in process.stdout:
            last.append(line)
            sys.stderr.write(line)
        process.wait()
    finally:
        process.stdout.close()
    if process.returncode != 0:
        raise LeanserveError(f"`flwr run` failed with status {process.returncode}:\n{''.join(last)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(deque(path.read_text(errors="replace").splitlines(keepends=True), maxlen=lines))
    except OSError:
        return ""


# --- the client: a SuperNode ------------------------------------------------------------------------------

def supernode_command(server: str, data: Path, *, root_certificates: str | None = None,
                      runtime_port: int | None = None, auth_key: str | None = None) -> list[str]:
    """The ``flower-supernode`` command line that joins ``server`` (HOST:PORT) with ``data`` as its data.
    ``runtime_port``: the loopback port of the SuperNode's own Runtime API, where its ClientApp processes
    connect (default: a free one, so that several SuperNodes can share a machine). ``auth_key``: the
    SuperNode's private key, for a federation that authenticates SuperNodes; it needs ``root_certificates``
    (Flower authenticates only over TLS). Raises InvalidInput for a bad address, or a key without TLS."""
    parse_address(server, "--server")
    if auth_key is not None and not root_certificates:
        raise InvalidInput("--auth-key: needs --root-certificates (Flower's SuperNode authentication runs only "
                           "over TLS)")
    command = [_script("flower-supernode"), "--superlink", server,
               "--node-config", f"{DATA_PATH_KEY}={json.dumps(str(Path(data).resolve()))}",
               "--host", "127.0.0.1", "--port", str(runtime_port or free_port())]
    command += ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    command += ["--auth-supernode-private-key", str(Path(auth_key).resolve())] if auth_key else []
    return command


def run_client(server: str, data: Path, *, root_certificates: str | None = None, runtime_port: int | None = None,
               auth_key: str | None = None) -> None:
    """Become a SuperNode of the federation at ``server`` (this process is replaced; it runs until stopped),
    authenticating with the private key ``auth_key`` if given. Raises InvalidInput first when ``data`` is not
    usable training data, or the key is not one Flower reads or comes without ``root_certificates``."""
    load_client_data(data)
    command = supernode_command(server, data, root_certificates=root_certificates, runtime_port=runtime_port,
                                auth_key=auth_key)
    if auth_key is not None:
        check_private_key(auth_key)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, flower_env())
