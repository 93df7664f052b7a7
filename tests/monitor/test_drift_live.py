"""Drift end to end: a reference profile stored with a version, live traffic logged by a real server,
the monitoring round comparing them, and the drift alert it raises."""

import httpx
import numpy as np
import orjson

from conftest import wait_until
from leanserve.monitor.reference import build_reference, load_reference


def send(server, rows):
    for i, row in enumerate(rows):
        body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": row.tolist()}]})
        assert httpx.post(server.url + "/v2/models/affine/infer", content=body).status_code == 200


def test_shifted_live_traffic_raises_a_drift_alert_and_same_distribution_does_not(affine_repo, live_server_factory):
    rng = np.random.default_rng(0)
    build_reference(affine_repo, "affine", 1, {"x": rng.normal(0, 1, (1000, 4)).astype(np.float32)})
    assert load_reference(affine_repo, "affine", 1) is not None
    server = live_server_factory(affine_repo.root, guard_interval_s=0.2)

    send(server, rng.normal(0, 1, (120, 4)).astype(np.float32))  # same distribution
    wait_until(lambda: (("affine", 1) in server.server.monitor.drift), what="a drift check")
    assert server.server.monitor.drift[("affine", 1)]["drifted"] is False

    shifted = rng.normal(0, 1, (400, 4)).astype(np.float32)
    shifted[:, 2] += 3.0  # one feature moves
    send(server, shifted)
    status = wait_until(lambda: (s := httpx.get(server.url + "/v2/monitor/models/affine").json())["versions"]["1"]["drifted"] and s,
                        timeout_s=30, what="drift detected")
    assert any("x[2]" in feature or "[2]" in feature for feature in status["versions"]["1"]["drift_features"])
    assert {a["rule"] for a in status["alerts"]} >= {"drift"}
    assert 'leanserve_drift_detected{model="affine",version="1"} 1.0' in httpx.get(server.url + "/metrics").text


def test_profile_command_stores_a_reference(affine_repo, tmp_path, capsys):
    from leanserve.cli import main

    np.savez(tmp_path / "ref.npz", x=np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32))
    assert main(["profile", "affine:1", "--data", str(tmp_path / "ref.npz"), "--repo", str(affine_repo.root)]) == 0
    assert "reference profile of affine:1 from 200 rows" in capsys.readouterr().out
    assert load_reference(affine_repo, "affine", 1) is not None
    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 4), np.float32))
    assert main(["profile", "affine", "--data", str(tmp_path / "bad.npz"), "--repo", str(affine_repo.root)]) == 1
    assert "no array for input 'x'" in capsys.readouterr().err
