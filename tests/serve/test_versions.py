"""Versions come and go while the server runs: new ones load, removed ones unload, broken ones are refused."""

import threading

import httpx
import orjson
import pytest

from conftest import make_affine_model, wait_until
from leanserve import VersionPolicy

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})


def served_version(server) -> str:
    return httpx.post(server.url + "/v2/models/affine/infer", content=BODY, timeout=10).json().get("model_version")


def test_new_version_is_picked_up_and_old_one_unloaded_without_restart(affine_repo, affine_onnx, live_server_factory):
    server = live_server_factory(affine_repo.root)
    assert served_version(server) == "1"
    affine_repo.add(affine_onnx, "affine", serve=True)
    wait_until(lambda: served_version(server) == "2", what="version 2 served")
    meta = httpx.get(server.url + "/v2/models/affine").json()
    assert meta["versions"] == ["2"]


def test_requests_keep_succeeding_while_versions_change(affine_repo, affine_onnx, live_server_factory):
    server = live_server_factory(affine_repo.root)
    failures, statuses, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                response = client.post(server.url + "/v2/models/affine/infer", content=BODY)
                statuses.append(response.status_code)
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for expected in ("2", "3"):
        affine_repo.add(affine_onnx, "affine", serve=True)
        wait_until(lambda: served_version(server) == expected, what=f"version {expected}")
    stop.set()
    for thread in threads:
        thread.join()
    assert len(statuses) > 20 and failures == []


def test_removed_version_is_unloaded(affine_repo, affine_onnx, live_server_factory):
    affine_repo.update_config("affine", version_policy=VersionPolicy(kind="all"))
    affine_repo.add(affine_onnx, "affine", serve=True)
    server = live_server_factory(affine_repo.root)
    assert httpx.get(server.url + "/v2/models/affine").json()["versions"] == ["1", "2"]
    affine_repo.remove("affine", 2)
    wait_until(lambda: httpx.get(server.url + "/v2/models/affine").json()["versions"] == ["1"], what="version 2 unloaded")
    assert served_version(server) == "1"


def test_version_that_fails_to_load_is_reported_and_previous_keeps_serving(affine_repo, tmp_path, live_server_factory):
    server = live_server_factory(affine_repo.root, admin_token="t")
    broken = make_affine_model(tmp_path / "broken.onnx")
    ref = affine_repo.add(broken, "affine", serve=True)
    artifact = affine_repo.get("affine", ref.version)
    artifact.model_path.write_bytes(b"corrupted after import")  # checksum no longer matches
    status = wait_until(
        lambda: httpx.get(server.url + "/v2/admin/models", headers={"Authorization": "Bearer t"}).json()["models"]["affine"]["failed"],
        what="load failure reported")
    assert "checksum mismatch" in status["2"]
    assert served_version(server) == "1"
    response = httpx.post(server.url + "/v2/models/affine/versions/2/infer", content=BODY)
    assert response.status_code == 503 and "failed to load" in response.json()["error"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_model_load_failures_total{model="affine",version="2"} 1.0' in metrics


def test_new_model_added_while_running_is_served(affine_repo, affine_onnx, live_server_factory):
    server = live_server_factory(affine_repo.root)
    affine_repo.add(affine_onnx, "second")
    wait_until(lambda: httpx.get(server.url + "/v2/models/second/ready").status_code == 200, what="second model ready")


@pytest.mark.parametrize("policy, expected", [(VersionPolicy(kind="latest", n=2), ["2", "3"]),
                                              (VersionPolicy(kind="specific", versions=(1, 3)), ["1", "3"])])
def test_version_policy_decides_what_is_loaded(affine_repo, affine_onnx, live_server_factory, policy, expected):
    affine_repo.add(affine_onnx, "affine", serve=True)
    affine_repo.add(affine_onnx, "affine", serve=True)
    affine_repo.update_config("affine", version_policy=policy)
    server = live_server_factory(affine_repo.root)
    assert httpx.get(server.url + "/v2/models/affine").json()["versions"] == expected
