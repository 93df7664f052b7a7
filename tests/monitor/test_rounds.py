"""The monitor's slow round runs in a low-priority worker process that never outlives its server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import free_port, wait_until


def spawned_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid \
                    and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_round_worker_runs_at_lowest_priority_and_ends_with_a_killed_server(affine_repo):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "serve", str(affine_repo.root), "--port", str(port),
                               "--grpc-port", "0", "--no-access-log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=60, what="server ready")
        (worker,) = spawned_children(server.pid)  # started with the server
        wait_until(lambda: os.getpriority(os.PRIO_PROCESS, worker) == 19, timeout_s=30, what="the worker at nice 19")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        wait_until(lambda: not alive(worker), timeout_s=10, what="the worker to end with its server")
    finally:
        if server.poll() is None:
            server.kill()
