"""The server serves what the traffic settings say, knows a version by its manifest, survives odd folders
and broken versions, and says it is not ready when a model has nothing to serve."""

import shutil

import grpc
import httpx
import orjson
import pytest
from onnx import TensorProto, helper

from conftest import LiveServer, wait_until
from leanserve.artifact import Provenance

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
ADMIN = {"Authorization": "Bearer t"}


def make_scale_model(path, k: float):
    """y = k * x on x FP32 [-1, 4]: models told apart by their answers."""
    factor = helper.make_tensor("k", TensorProto.FLOAT, [], [k])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [factor])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def answer(server, model="scale"):
    doc = httpx.post(f"{server.url}/v2/models/{model}/infer", content=BODY, timeout=10).json()
    return doc.get("model_version"), doc.get("outputs", [{}])[0].get("data")


def test_registered_derived_version_takes_no_traffic(repo, tmp_path, live_server_factory):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    server = live_server_factory(repo.root, admin_token="t")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale", provenance=Provenance(parent="scale:1"), serve=False)
    status = wait_until(lambda: httpx.get(server.url + "/v2/admin/models", headers=ADMIN).json()["models"]["scale"],
                        what="admin status")
    wait_until(lambda: httpx.get(server.url + "/v2/admin/models", headers=ADMIN).json()["models"]["scale"]["states"]
               == {"1": "serving", "2": "registered"}, what="states")
    assert status["loaded"] == [1] and answer(server) == ("1", [2.0, 4.0, 6.0, 8.0])


def test_promote_over_the_admin_api_moves_traffic(repo, tmp_path, live_server_factory):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale")
    server = live_server_factory(repo.root, admin_token="t")
    response = httpx.post(server.url + "/v2/admin/models/scale/promote", headers=ADMIN, json={"version": 2})
    assert response.status_code == 200 and response.json()["promoted"] == 2
    assert answer(server) == ("2", [3.0, 6.0, 9.0, 12.0])


def test_a_version_replaced_on_disk_is_reloaded_never_served_stale(repo, tmp_path, live_server_factory):
    """rm + import within one poll interval: the folder under a served number now holds another model."""
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    scratch = type(repo)(tmp_path / "scratch")
    scratch.add(make_scale_model(tmp_path / "b.onnx", 5.0), "scale")
    server = live_server_factory(repo.root)  # the fixture polls every 0.1 s
    assert answer(server) == ("1", [2.0, 4.0, 6.0, 8.0])
    folder = repo.root / "scale" / "1"
    shutil.rmtree(folder)
    shutil.copytree(scratch.root / "scale" / "1", folder)  # same number, other weights, within the interval
    wait_until(lambda: answer(server) == ("1", [5.0, 10.0, 15.0, 20.0]), what="the new weights served")


def test_rm_and_import_gives_a_new_number_that_the_server_serves(repo, tmp_path, live_server_factory):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale", serve=True)
    server = live_server_factory(repo.root)  # the fixture polls every 0.1 s
    assert answer(server) == ("2", [3.0, 6.0, 9.0, 12.0])
    repo.remove("scale", 2)
    ref = repo.add(make_scale_model(tmp_path / "c.onnx", 4.0), "scale", serve=True)
    assert ref.version == 3
    wait_until(lambda: answer(server) == ("3", [4.0, 8.0, 12.0, 16.0]), what="version 3 served")


def test_restart_with_a_broken_newest_version_serves_the_previous_one(repo, tmp_path):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    shutil.copytree(repo.root / "scale" / "1", repo.root / "scale" / "2")  # copied by hand, then damaged
    (repo.root / "scale" / "2" / repo.get("scale", 1).model_path.name).write_bytes(b"truncated")
    repo.promote("scale", 2)
    server = LiveServer(repo.root).start()  # waits for /v2/health/ready
    try:
        assert answer(server) == ("1", [2.0, 4.0, 6.0, 8.0])
        assert httpx.get(server.url + "/v2/models/scale/ready").status_code == 200
        assert 'leanserve_model_load_failures_total{model="scale",version="2"} 1.0' in httpx.get(server.url + "/metrics").text
    finally:
        server.stop()


def test_ready_is_false_while_a_model_has_nothing_that_can_serve(repo, tmp_path):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    repo.get("scale", 1).model_path.write_bytes(b"truncated")
    server = LiveServer(repo.root)
    server._thread.start()
    try:
        def probe():
            try:
                return httpx.get(server.url + "/v2/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(probe, what="server live")
        wait_until(lambda: "leanserve_model_load_failures_total{" in httpx.get(server.url + "/metrics").text,
                   what="the load failure")
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
        assert httpx.get(server.url + "/v2/models/scale/ready").status_code == 503
    finally:
        server.stop()


def test_an_odd_folder_leaves_the_watcher_alive_and_later_imports_load(repo, tmp_path, live_server_factory):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    server = live_server_factory(repo.root)  # the fixture polls every 0.1 s
    shutil.copytree(repo.root / "scale" / "1", repo.root / "scale" / "²")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale", serve=True)
    wait_until(lambda: answer(server) == ("2", [3.0, 6.0, 9.0, 12.0]), what="the later import served")
    assert "leanserve_watcher_errors" in httpx.get(server.url + "/metrics").text


@pytest.mark.parametrize("path", ["/v2/models/scale/versions/%C2%B2", "/v2/models/scale/versions/%C2%B2/ready",
                                  "/v2/models/scale/versions/%D9%A3/infer"])
def test_unicode_versions_get_400_over_rest(repo, tmp_path, live_server_factory, path):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    server = live_server_factory(repo.root)
    method = httpx.post if path.endswith("infer") else httpx.get
    response = method(server.url + path, **({"content": BODY} if path.endswith("infer") else {}))
    assert response.status_code in (400, 404)
    assert response.status_code != 500


def test_unicode_versions_get_invalid_argument_over_grpc(repo, tmp_path, live_server_factory):
    from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb
    from leanserve.serve.protocol import grpc_predict_v2_pb2_grpc as pb_grpc

    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    server = live_server_factory(repo.root)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="scale", version="²"))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("route, body, field", [
    ("traffic", {"weights": {"²": 1}}, "invalid version '²'"),
    ("traffic", {"weights": {"1": "a"}}, "weights: the weight of version 1"),
    ("traffic", {"shadow": True}, "shadow: expected"),
    ("canary", {"version": 2, "step_interval_s": "a"}, "rollout.step_interval_s"),
    ("canary", {"version": 2, "max_p99_ratio": None}, "rollout.max_p99_ratio"),
    ("canary", {"version": 2, "confidence": 2}, "rollout.confidence"),
    ("canary", {"version": 2, "stage": 1}, "stage: unknown rollout setting"),
    ("canary", {"version": True}, "version: expected a version number"),
    ("canary", {"version": 2, "steps": "5,50"}, "steps: expected a list"),
    ("promote", {"version": "2"}, "version: expected a version number"),
])
def test_admin_bodies_are_type_checked_with_the_field_named(repo, tmp_path, live_server_factory, route, body, field):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale")
    server = live_server_factory(repo.root, admin_token="t")
    response = httpx.post(f"{server.url}/v2/admin/models/scale/{route}", headers=ADMIN, json=body)
    assert response.status_code == 400 and field in response.json()["error"]


def test_a_canary_accepts_the_confidence_setting(repo, tmp_path, live_server_factory):
    repo.add(make_scale_model(tmp_path / "a.onnx", 2.0), "scale")
    repo.add(make_scale_model(tmp_path / "b.onnx", 3.0), "scale")
    server = live_server_factory(repo.root, admin_token="t")
    response = httpx.post(server.url + "/v2/admin/models/scale/canary", headers=ADMIN,
                          json={"version": 2, "confidence": 0.9, "step_interval_s": 60})
    assert response.status_code == 200 and response.json()["states"] == {"1": "serving", "2": "canary"}
    assert repo.config("scale").rollout.confidence == 0.9
