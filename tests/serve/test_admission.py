"""Admission control on a real server: load is refused before its body is read, large bodies are taken
a few at a time, and a large JSON body that declares the wrong shape is refused before it is parsed."""

from __future__ import annotations

import socket
import time

import httpx
import orjson

from conftest import wait_until




def raw_request(port: int, headers: bytes, body: bytes = b"", timeout_s: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(headers + body)
        return sock.recv(65536)


def post_head(length: int) -> bytes:
    return (f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_large_body_beyond_the_cap_gets_503_with_retry_after_before_it_is_sent(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, max_large_bodies=1, body_timeout_s=10)
    big = 2 << 20
    slow = socket.create_connection(("127.0.0.1", server.port))
    try:
        slow.sendall(post_head(big) + b'{"inputs": [')  # takes the one large-body slot and keeps it
        rest = server.server.app.rest
        wait_until(lambda: rest._large_in_progress == 1, timeout_s=10, what="the slow body to hold the slot")
        started = time.monotonic()
        reply = raw_request(server.port, post_head(big))  # no body sent at all
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
        assert b"large requests" in reply and time.monotonic() - started < 2  # answered without waiting for the body
    finally:
        slow.close()
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    assert httpx.post(server.url + "/v2/models/affine/infer", content=body).status_code == 200


def test_a_large_json_body_declaring_the_wrong_shape_is_refused_before_it_is_parsed(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root)
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,500000],"data":['
    body = head + b"0.5," * 500_000 + b"BROKEN"  # not valid JSON after its header: only a full parse would see it
    response = httpx.post(server.url + "/v2/models/affine/infer", content=body, timeout=30)
    assert response.status_code == 400 and "dimension 1 must be 4, got 500000" in response.json()["error"]


def test_an_overloaded_version_sheds_with_503_and_keeps_serving(repo, tmp_path, live_server_factory):
    import asyncio

    from conftest import make_heavy_model
    from leanserve import BatchingConfig

    repo.add(make_heavy_model(tmp_path / "heavy.onnx"), "heavy")
    repo.update_config("heavy", batching=BatchingConfig(max_batch_size=1, max_queue_wait_ms=20))
    server = live_server_factory(repo.root)
    meta = httpx.get(server.url + "/v2/models/heavy").json()["inputs"][0]
    shape = [1 if d == -1 else d for d in meta["shape"]]
    count = 1
    for d in shape:
        count *= d
    body = orjson.dumps({"inputs": [{"name": meta["name"], "datatype": meta["datatype"], "shape": shape,
                                     "data": [0.5] * count}]})

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(server.url + "/v2/models/heavy/infer", content=body) for _ in range(40)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    assert httpx.post(server.url + "/v2/models/heavy/infer", content=body, timeout=60).status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_rejected_requests_total{model="heavy",reason="overloaded",version="1"}' in metrics




def test_a_connection_refused_again_and_again_is_held_longer_until_it_is_served(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    import numpy as np

    from leanserve.artifact import Signature, TensorSpec
    from leanserve.errors import Overloaded
    from leanserve.serve.accesslog import AccessLog
    from leanserve.serve.protocol import rest
    from leanserve.serve.protocol.codec import InferResponse
    from leanserve.serve.settings import ServerConfig

    class Plane:  # sheds until told not to, then answers y = x
        shedding = True
        handle = SimpleNamespace(batcher=SimpleNamespace(admit=lambda: None),
                                 signature=Signature((TensorSpec("x", "FP32", (-1, 1)),), (TensorSpec("y", "FP32", (-1, 1)),)))

        def route(self, model, version, key):
            if self.shedding:
                raise Overloaded("the queue is full")
            return SimpleNamespace(handle=self.handle, shadow=None)

        async def infer(self, routed, request, protocol):
            return InferResponse("m", "1", {"y": request.inputs["x"]}, request.id)

    holds: list[float] = []

    async def hold(seconds):
        holds.append(seconds)

    monkeypatch.setattr(rest.asyncio, "sleep", hold)
    plane = Plane()
    api = rest.RestApi(plane, ServerConfig(repo=".", shed_hold_s=0.5), AccessLog(False))
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]})

    async def request(client) -> int:
        scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "client": client,
                 "headers": [(b"content-length", str(len(body)).encode())]}
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await api.infer(scope, receive, send, "m", None)
        return sent[0]["status"]

    async def scenario():
        a, b = ("127.0.0.1", 1000), ("127.0.0.1", 1001)
        assert [await request(a) for _ in range(4)] == [503] * 4
        assert await request(b) == 503  # another connection starts at the first hold
        plane.shedding = False
        assert await request(a) == 200  # served: forgiven
        plane.shedding = True
        assert await request(a) == 503

    asyncio.run(scenario())
    assert holds == [0.5, 1.0, 2.0, 2.0, 0.5, 0.5]
