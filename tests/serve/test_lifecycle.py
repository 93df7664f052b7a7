"""Start-up and shutdown of a real `leanserve serve` process: readiness after warm-up, SIGTERM drains."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import orjson

from conftest import free_port, wait_until
from leanserve import BatchingConfig
from leanserve.serve.dataplane import DataPlane
from leanserve.serve.metrics import ServerMetrics
from leanserve.serve.registry import ModelRegistry

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})


def test_ready_only_after_models_are_loaded_and_warm(affine_repo):
    metrics = ServerMetrics()
    registry = ModelRegistry(affine_repo, metrics)
    plane = DataPlane(registry, metrics)

    async def scenario():
        before = plane.ready()
        await registry.sync()
        after = plane.ready(), plane.model_ready("affine")
        await registry.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert before is False and after == (True, True)


def start_server(repo: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "leanserve.cli", "serve", str(repo), "--port", str(port), "--grpc-port", str(free_port()),
         "--drain-timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )


def test_sigterm_drains_in_flight_requests_then_exits(affine_repo):
    # A long queue delay keeps a lone request in flight for ~1.5 s: long enough to send SIGTERM meanwhile.
    affine_repo.update_config("affine", batching=BatchingConfig(max_batch_size=64, max_queue_delay_us=1_500_000))
    port = free_port()
    process = start_server(affine_repo.root, port)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=60, what="server ready")
        results: list[int] = []
        worker = threading.Thread(target=lambda: results.append(httpx.post(url + "/v2/models/affine/infer", content=BODY, timeout=20).status_code))
        worker.start()
        wait_until(lambda: 'leanserve_in_flight_requests{model="affine",version="1"} 1.0' in httpx.get(url + "/metrics").text,
                   what="request in flight")
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=20)
        assert results == [200]
        # uvicorn re-raises the captured SIGTERM once shutdown is complete, as a well-behaved process does.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        output = process.stdout.read()
        assert "server stopped" in output
    finally:
        if process.poll() is None:
            process.kill()


def test_grpc_port_zero_turns_grpc_off(tmp_path):
    from leanserve.serve.settings import ServerConfig

    assert ServerConfig.from_env(tmp_path, grpc_port=None).grpc_port is None
    assert ServerConfig.from_env(tmp_path, port=None).port == 8000
