"""`leanserve federate --listen`, tried as an attacker and as an operator stopping it: a stranger with no
credentials cannot run its own Flower app through any port the federation opens, and SIGTERM leaves no
Flower process behind."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")
pytest.importorskip("torch")

from test_federated import NO_PHONING_HOME, _eval_file, _leanserve, _untrained_cnn_repo  # noqa: E402

from leanserve.learn.federated.socket_patch import SOCKET_ENV  # noqa: E402

STRANGER_APP = '''\
from pathlib import Path

from flwr.serverapp import ServerApp

Path({marker!r}).write_text("the stranger's code ran")  # on import: any execution at all leaves the file

app = ServerApp()


@app.main()
def main(grid, context):
    Path({marker!r}).write_text("the stranger's ServerApp ran")
'''


def _stranger_app(folder: Path, marker: Path) -> Path:
    """A minimal Flower app project of a third party whose ServerApp writes ``marker``."""
    folder.mkdir()
    (folder / "stranger_app.py").write_text(STRANGER_APP.format(marker=str(marker)))
    (folder / "pyproject.toml").write_text("""\
[project]
name = "stranger"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "stranger_app:app"
clientapp = "stranger_app:app"
""")
    return folder


def _stranger_home(folder: Path, address: str) -> Path:
    folder.mkdir()
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n'
                                        f'[superlink.target]\naddress = "{address}"\ninsecure = true\n')
    return folder


def _flower_tree(root_pid: int) -> list:
    """The Flower processes started under ``root_pid`` (found by parentage, then by their environment)."""
    tree = psutil.Process(root_pid).children(recursive=True)
    try:
        sockets = {p.environ().get(SOCKET_ENV) for p in tree} - {None}
    except psutil.Error:
        sockets = set()
    found = {p.pid: p for p in tree}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(SOCKET_ENV) in sockets:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def _listening_tcp_ports(processes) -> set[int]:
    ports = set()
    for proc in processes:
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


@pytest.fixture(scope="module")
def waiting_federation(tmp_path_factory):
    """`leanserve federate --listen 127.0.0.1:P --clients 2` whose ServerApp is waiting for clients; yields
    (process, port, the Flower processes under it), and SIGTERMs it at the end if a test did not."""
    root = tmp_path_factory.mktemp("target")
    repo = _untrained_cnn_repo(root)
    port = free_port()
    server = subprocess.Popen(_leanserve("federate", "cnn", "--repo", repo.root, "--listen", f"127.0.0.1:{port}",
                                         "--clients", 2, "--join-timeout", 240, "--data", _eval_file(root)),
                              env={**os.environ, **NO_PHONING_HOME}, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + 150
    for line in server.stderr:  # the ServerApp is running once it reports who has joined
        if "0 of 2 clients connected" in line or time.monotonic() > deadline:
            break
    flower = _flower_tree(server.pid)
    try:
        yield server, port, flower
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        server.stderr.close()


def test_the_federation_listens_on_tcp_only_at_the_address_given(waiting_federation):
    server, port, flower = waiting_federation
    names = " | ".join(" ".join(p.cmdline()[:2]) for p in flower)
    assert "flower-superlink" in names and "flwr-serverapp" in names, names
    assert _listening_tcp_ports([psutil.Process(server.pid), *flower]) == {port}


def test_the_superlinks_socket_is_in_a_folder_only_its_user_can_enter(waiting_federation):
    _, _, flower = waiting_federation
    path = Path(next(p.environ()[SOCKET_ENV] for p in flower))
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.getuid()


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/list-apps-to-launch",
                                  "/v1/fleet/../control/start-run", "/docs"])
def test_the_public_port_refuses_everything_but_the_fleet_api(waiting_federation, path):
    import httpx

    _, port, _ = waiting_federation
    response = httpx.post(f"http://127.0.0.1:{port}{path}", content=b"", timeout=10)
    assert response.status_code == 404 and "only Flower's Fleet API" in response.text


def test_a_stranger_cannot_run_its_own_flower_app_on_the_federation(waiting_federation, tmp_path):
    _, port, _ = waiting_federation
    marker = tmp_path / "stranger-was-here"
    app = _stranger_app(tmp_path / "app", marker)
    home = _stranger_home(tmp_path / "home", f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if k not in (SOCKET_ENV, "PYTHONPATH")}
    flwr = Path(sys.executable).parent / "flwr"
    attack = subprocess.run([str(flwr), "run", str(app), "target", "--stream"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**env, **NO_PHONING_HOME, "FLWR_HOME": str(home)})
    assert attack.returncode != 0, attack.stdout[-2000:]
    assert not marker.exists()


def test_sigterm_stops_the_federation_and_every_flower_process(waiting_federation):
    server, port, flower = waiting_federation
    assert flower
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(flower, timeout=20)
    assert not [" ".join(p.cmdline()) for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as probe:  # the public port is closed
        assert probe.connect_ex(("127.0.0.1", port)) != 0
