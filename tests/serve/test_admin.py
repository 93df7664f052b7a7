"""Admin API (token, loopback), traffic splits, shadow comparison and rollback against a real server."""

from collections import Counter

import httpx
import orjson
import pytest

from conftest import wait_until
from leanserve.cli import main

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def three_versions(affine_repo, affine_onnx):
    affine_repo.add(affine_onnx, "affine", serve=True)  # each served in turn: v3 serves, v2 before it
    affine_repo.add(affine_onnx, "affine", serve=True)
    return affine_repo


def admin(server, path, json=None, headers=AUTH):
    return httpx.post(server.url + "/v2/admin/models/affine/" + path, json=json, headers=headers, timeout=20)


def test_admin_is_disabled_without_a_token_and_needs_the_right_one(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root)
    response = admin(server, "reload")
    assert response.status_code == 403 and "LEANSERVE_ADMIN_TOKEN" in response.json()["error"]
    server = live_server_factory(affine_repo.root, admin_token="s3cret")
    assert admin(server, "reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert admin(server, "reload", headers={}).status_code == 401
    assert admin(server, "reload").status_code == 200


def test_traffic_split_is_applied_and_persisted(three_versions, live_server_factory):
    server = live_server_factory(three_versions.root, admin_token="s3cret")
    response = admin(server, "traffic", {"weights": {"1": 70, "3": 30}})
    assert response.status_code == 200 and response.json()["loaded"] == [1, 3]
    counts = Counter(httpx.post(server.url + "/v2/models/affine/infer", content=BODY).json()["model_version"] for _ in range(200))
    assert set(counts) == {"1", "3"} and 30 < counts["3"] < 95
    assert three_versions.config("affine").traffic.weights == {"1": 70, "3": 30}


def test_sticky_routing_key_sees_one_version(three_versions, live_server_factory):
    server = live_server_factory(three_versions.root, admin_token="s3cret")
    admin(server, "traffic", {"weights": {"1": 50, "3": 50}})
    for user in ("ann", "ben", "cat"):
        seen = {httpx.post(server.url + "/v2/models/affine/infer", content=BODY, headers={"x-routing-key": user}).json()["model_version"]
                for _ in range(10)}
        assert len(seen) == 1


def test_shadow_gets_a_copy_and_agreement_is_recorded(three_versions, live_server_factory):
    server = live_server_factory(three_versions.root, admin_token="s3cret")
    admin(server, "traffic", {"weights": {"3": 100}, "shadow": 2})
    for _ in range(5):
        assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).json()["model_version"] == "3"
    agree = 'leanserve_shadow_comparisons_total{model="affine",primary="3",result="agree",shadow="2"} 5.0'
    wait_until(lambda: agree in httpx.get(server.url + "/metrics").text, what="shadow comparisons")
    assert 'leanserve_shadow_agreement_ratio{model="affine",primary="3",shadow="2"} 1.0' in httpx.get(server.url + "/metrics").text


def test_rollback_moves_all_traffic_in_one_step(three_versions, live_server_factory):
    server = live_server_factory(three_versions.root, admin_token="s3cret")
    admin(server, "traffic", {"weights": {"2": 100}})
    admin(server, "traffic", {"weights": {"2": 80, "3": 20}})
    response = admin(server, "rollback")
    assert response.status_code == 200 and response.json()["rolled_back_to"] == 2
    versions = {httpx.post(server.url + "/v2/models/affine/infer", content=BODY).json()["model_version"] for _ in range(30)}
    assert versions == {"2"}


def test_cli_rollback_is_picked_up_by_a_running_server(three_versions, live_server_factory, capsys):
    server = live_server_factory(three_versions.root)
    assert main(["traffic", "affine", "--weights", "3=100", "--repo", str(three_versions.root)]) == 0
    wait_until(lambda: httpx.post(server.url + "/v2/models/affine/infer", content=BODY).json()["model_version"] == "3", what="traffic to 3")
    assert main(["rollback", "affine", "--repo", str(three_versions.root)]) == 0
    assert "version 2" in capsys.readouterr().out
    wait_until(lambda: httpx.post(server.url + "/v2/models/affine/infer", content=BODY).json()["model_version"] == "2", what="rollback to 2")


@pytest.mark.parametrize("body, message", [
    ({"weights": {"9": 100}}, "no version 9"),
    ({"weights": {"1": -5}}, "weight of version 1"),
    ({"shadow": 42}, "shadow: expected an existing version"),
    ({"colour": "red"}, "traffic body must be"),
])
def test_bad_traffic_requests_are_refused(three_versions, live_server_factory, body, message):
    server = live_server_factory(three_versions.root, admin_token="s3cret")
    response = admin(server, "traffic", body)
    assert response.status_code == 400 and message in response.json()["error"]


def test_unload_and_load(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, admin_token="s3cret")
    assert admin(server, "unload").json()["loaded"] == []
    assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 503
    assert admin(server, "load").json()["loaded"] == [1]
    assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 200


def test_concurrent_reloads_never_drop_requests(affine_repo, live_server_factory):
    import threading

    server = live_server_factory(affine_repo.root, admin_token="s3cret")
    statuses: list[int] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                statuses.append(client.post(server.url + "/v2/models/affine/infer", content=BODY).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    reloads = [threading.Thread(target=lambda: admin(server, "reload")) for _ in range(4)]
    for thread in workers + reloads:
        thread.start()
    for thread in reloads:
        thread.join()
    stop.set()
    for thread in workers:
        thread.join()
    assert statuses and set(statuses) == {200}
