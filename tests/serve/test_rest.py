"""A real server on a loopback port, driven with plain HTTP (httpx) and with tritonclient.http."""

import json

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http

from conftest import make_sequence_model, make_string_model, wait_until
from leanserve import CacheConfig


@pytest.fixture
def server(affine_repo, live_server_factory):
    return live_server_factory(affine_repo.root)


def infer_body(data=None, shape=(1, 4), datatype="FP32", name="x", **extra):
    data = data if data is not None else list(range(int(np.prod(shape))))
    return orjson.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}], **extra})


def post(server, body, path="/v2/models/affine/infer", **kwargs):
    return httpx.post(server.url + path, content=body, timeout=10, **kwargs)


def test_health_and_metadata(server):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "leanserve" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(server.url + "/v2/models/affine").json()
    assert model["versions"] == ["1"] and model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert httpx.get(server.url + "/v2/models/affine/versions/1").status_code == 200
    assert httpx.get(server.url + "/v2/models/affine/ready").json()["ready"] is True
    assert httpx.get(server.url + "/v2/models/affine/versions/1/ready").status_code == 200


def test_json_inference_with_id_parameters_and_requested_outputs(server):
    response = post(server, infer_body(id="abc", outputs=[{"name": "s"}]))
    assert response.status_code == 200
    doc = response.json()
    assert doc["id"] == "abc" and doc["model_name"] == "affine" and doc["model_version"] == "1"
    assert doc["outputs"] == [{"name": "s", "datatype": "FP32", "shape": [1, 1], "data": [6.0]}]
    assert response.headers["x-request-id"] == "abc"


def test_binary_extension_in_and_out(server):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    response = post(server, head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    meta = orjson.loads(response.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 32
    np.testing.assert_array_equal(np.frombuffer(response.content[length:], np.float32).reshape(2, 4), x * 2 + 1)


@pytest.mark.parametrize("body, status, message", [
    (b"{nope", 400, "not valid JSON"),
    (infer_body(datatype="INT64"), 400, "input 'x': expected datatype FP32, got INT64"),
    (infer_body(shape=(1, 5)), 400, "input 'x': dimension 1 must be 4, got 5"),
    (infer_body(data=[1, 2]), 400, "needs 4 values, data has 2"),
    (infer_body(name="z"), 400, "unexpected input 'z'"),
    (infer_body(outputs=[{"name": "nope"}]), 400, "unknown output 'nope'"),
    (infer_body(shape=(0, 4), data=[]), 400, "empty batch"),
])
def test_bad_requests_get_a_precise_400_and_the_server_keeps_serving(server, body, status, message):
    response = post(server, body)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert post(server, infer_body()).status_code == 200


def test_unknown_model_or_version_is_404(server):
    assert post(server, infer_body(), "/v2/models/nope/infer").status_code == 404
    response = post(server, infer_body(), "/v2/models/affine/versions/9/infer")
    assert response.status_code == 404 and "not loaded" in response.json()["error"]
    assert httpx.get(server.url + "/v2/models/nope").status_code == 404
    assert post(server, infer_body(), "/v2/models/affine/versions/abc/infer").status_code == 400


def test_huge_body_is_refused_with_413(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, max_body_bytes=1000)
    response = post(server, infer_body(data=[0.0] * 400, shape=(100, 4)))
    assert response.status_code == 413 and "exceeds the limit of 1000 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 200

    assert post(server, chunks()).status_code == 413
    assert post(server, infer_body()).status_code == 200


def test_element_count_limit(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, max_elements=8)
    response = post(server, infer_body(shape=(4, 4), data=[0] * 16))
    assert response.status_code == 400 and "exceed the limit of 8" in response.json()["error"]


def test_nan_refused_only_when_the_model_says_so(affine_repo, live_server_factory):
    affine_repo.update_config("affine", allow_nonfinite=False)
    server = live_server_factory(affine_repo.root)
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[NaN,1,2,3]}]}'
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]})
    raw = np.array([np.nan, 1, 2, 3], np.float32).tobytes()
    response = post(server, head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 400 and "NaN or Inf" in response.json()["error"]
    assert post(server, body).status_code == 400


def test_tritonclient_http_infers_and_reads_metadata(server):
    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("affine")
    assert client.get_model_metadata("affine")["inputs"][0]["name"] == "x"
    for binary in (False, True):
        x = np.random.rand(3, 4).astype(np.float32)
        tensor = triton_http.InferInput("x", [3, 4], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("affine", [tensor], outputs=[triton_http.InferRequestedOutput("y", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("y"), x * 2 + 1, rtol=1e-6)


def test_bytes_and_sequence_models_over_http(repo, tmp_path, live_server_factory):
    repo.add(make_string_model(tmp_path / "s.onnx"), "strings")
    repo.add(make_sequence_model(tmp_path / "q.onnx"), "seq")
    server = live_server_factory(repo.root)
    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    text = np.array([b"hi", "\u00fcber".encode()], dtype=object)
    for binary in (False, True):
        tensor = triton_http.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(text, binary_data=binary)
        assert client.infer("strings", [tensor]).as_numpy("echo").tolist() == text.tolist()
    tokens = triton_http.InferInput("tokens", [1, 3], "INT64")
    tokens.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
    assert client.infer("seq", [tokens]).as_numpy("total").tolist() == [[6.0]]


def test_metrics_are_exported_per_model_and_version(server):
    post(server, infer_body())
    post(server, b"{bad")
    text = httpx.get(server.url + "/metrics").text
    assert 'leanserve_requests_total{model="affine",outcome="success",protocol="http",version="1"}' in text
    assert 'leanserve_batch_size_count{model="affine",version="1"}' in text
    assert 'leanserve_queue_seconds_bucket' in text and 'leanserve_compute_seconds_bucket' in text
    assert 'leanserve_model_loaded{model="affine",version="1"} 1.0' in text


def test_access_log_lines_are_json_with_request_ids(server):
    post(server, infer_body(id="trace-me"))
    post(server, b"{bad", headers={"x-request-id": "bad-one"})

    def flushed():  # lines are written in bursts, at most 0.2 s after the request
        records = [json.loads(line) for chunk in list(server.log_lines) for line in chunk.splitlines()]
        return records if {"trace-me", "bad-one"} <= {r["request_id"] for r in records} else None

    records = wait_until(flushed, timeout_s=5, what="access log lines written")
    ok = next(r for r in records if r["request_id"] == "trace-me")
    assert ok["status"] == 200 and ok["model"] == "affine" and ok["version"] == "1" and ok["ms"] > 0
    assert next(r for r in records if r["request_id"] == "bad-one")["status"] == 400


def test_response_cache_hits_are_counted(affine_repo, live_server_factory):
    affine_repo.update_config("affine", cache=CacheConfig(max_bytes=1 << 20))
    server = live_server_factory(affine_repo.root)
    first, second = post(server, infer_body()), post(server, infer_body())
    assert first.json()["outputs"] == second.json()["outputs"]
    text = httpx.get(server.url + "/metrics").text
    assert 'leanserve_cache_total{model="affine",result="hit",version="1"} 1.0' in text
    assert 'leanserve_cache_total{model="affine",result="miss",version="1"} 1.0' in text


def test_openapi_document_lists_exactly_the_served_routes(server):
    from starlette.routing import Route

    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    served = {(r.path, m.lower()) for r in server.server.app.routes if isinstance(r, Route) for m in r.methods if m != "HEAD"}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented


def raw_http(server, data: bytes, wait_s: float = 5.0) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks) or b'"outputs"' in b"".join(chunks):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_slow_client_that_never_finishes_its_body_gets_408(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, body_timeout_s=0.5)
    head = b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    reply = raw_http(server, head + b'{"inputs": [')
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
    assert post(server, infer_body()).status_code == 200


def test_content_length_shorter_than_the_body_is_a_400_not_a_crash(server):
    body = infer_body()
    head = f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) - 10}\r\n\r\n".encode()
    reply = raw_http(server, head + body)
    # Either our JSON decoder or the HTTP parser (for the left-over bytes) answers 400 first.
    assert reply.startswith(b"HTTP/1.1 400")
    assert post(server, infer_body()).status_code == 200


def test_overload_is_refused_at_once_with_503_and_retry_after(repo, tmp_path, live_server_factory):
    import asyncio

    from conftest import make_heavy_model
    from leanserve import BatchingConfig

    repo.add(make_heavy_model(tmp_path / "heavy.onnx"), "heavy")
    repo.update_config("heavy", batching=BatchingConfig(max_batch_size=1, max_queue_size=1))
    server = live_server_factory(repo.root)
    body = infer_body(name="x", shape=(1, 512), data=[0.1] * 512)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(server.url + "/v2/models/heavy/infer", content=body) for _ in range(40)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1" and "queue is full" in rejected.json()["error"]
    assert post(server, body, "/v2/models/heavy/infer").status_code == 200


def test_serving_an_onnx_model_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, leanserve, leanserve.server, leanserve.serve.protocol.grpc, leanserve.runtime.onnxruntime; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_engine_failure_is_a_json_500_and_the_server_keeps_serving(repo, tmp_path, live_server_factory):
    from conftest import make_failing_model

    repo.add(make_failing_model(tmp_path / "failing.onnx"), "failing")
    server = live_server_factory(repo.root)
    response = post(server, infer_body(), "/v2/models/failing/infer")
    assert response.status_code == 500 and "the engine failed" in response.json()["error"]
    assert post(server, infer_body(data=[0, 0, 0, 0]), "/v2/models/failing/infer").status_code == 200
