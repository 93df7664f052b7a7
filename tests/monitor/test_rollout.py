"""Guarded rollout: the judgement alone, and a real server that promotes a good canary and rolls back a slow one."""

import threading

import httpx
import orjson
import pytest

from conftest import make_failing_model, wait_until
from leanserve.config import RolloutConfig, TrafficConfig
from leanserve.errors import InvalidInput
from leanserve.monitor.live import WindowStats
from leanserve.monitor.rollout import judge, read_events, start_rollout

FAST = WindowStats(200, 0, 0.0, 0.2, 0.5, 100.0)
CONFIG = RolloutConfig(canary=2, primary=1, step_interval_s=10, min_requests=50)


def test_judge_rolls_back_a_canary_that_disagreed_as_shadow():
    assert judge(CONFIG, FAST, FAST, 30, shadow_agreement=0.80).action == "rollback"
    assert "agreed with the primary on 80.0%" in judge(CONFIG, FAST, FAST, 30, shadow_agreement=0.80).reason
    assert judge(CONFIG, FAST, FAST, 30, shadow_agreement=0.99).action == "advance"


@pytest.mark.parametrize("canary, age, quality, action, reason", [
    (WindowStats(10, 0, 0.0, 0.2, 0.5, 5.0), 30, None, "hold", ""),
    (FAST, 5, None, "hold", ""),
    (FAST, 30, None, "advance", ""),
    (WindowStats(200, 10, 0.05, 0.2, 0.5, 100.0), 30, None, "rollback", "error rate 5.00%"),
    (WindowStats(200, 0, 0.0, 0.2, 2.0, 100.0), 30, None, "advance", ""),  # x4, but within the 2 ms slack
    (WindowStats(200, 0, 0.0, 0.2, 5.0, 100.0), 30, None, "rollback", "p99 latency 5.00 ms"),
    (FAST, 30, (0.90, 0.97), "rollback", "live quality 0.9000"),
])
def test_judge(canary, age, quality, action, reason):
    canary_q, primary_q = quality or (None, None)
    verdict = judge(CONFIG, canary, FAST, age, canary_q, primary_q)
    assert verdict.action == action and reason in verdict.reason


def drive_traffic(server, stop):
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                         "outputs": [{"name": "y"}]})
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            client.post(server.url + "/v2/models/affine/infer", content=body)


def run_canary(server, repo, version, **settings):
    stop = threading.Event()
    workers = [threading.Thread(target=drive_traffic, args=(server, stop)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        response = httpx.post(server.url + "/v2/admin/models/affine/canary", headers={"Authorization": "Bearer t"},
                              json={"version": version, "steps": [20, 50, 100], "step_interval_s": 0.5, "min_requests": 20,
                                    **settings})
        assert response.status_code == 200, response.text
        wait_until(lambda: not repo.config("affine").rollout.active, timeout_s=60, what="rollout to finish")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return read_events(repo, "affine")


def new_version_without_traffic(repo, path):
    repo.update_config("affine", traffic=TrafficConfig(weights={"1": 100}))  # v1 keeps serving meanwhile
    repo.add(path, "affine")


def test_good_canary_is_promoted_step_by_step(affine_repo, affine_onnx, live_server_factory):
    new_version_without_traffic(affine_repo, affine_onnx)
    server = live_server_factory(affine_repo.root, admin_token="t", guard_interval_s=0.2)
    # Latency bounds wide open: this test is about the steps, not about timing on a busy machine.
    events = run_canary(server, affine_repo, 2, max_p99_ratio=100, p99_slack_ms=1000)
    assert [e["action"] for e in events] == ["start", "advance", "advance", "promoted"]
    assert affine_repo.config("affine").traffic.weights == {"2": 100}


def test_failing_canary_is_rolled_back_with_the_reason(affine_repo, tmp_path, live_server_factory):
    new_version_without_traffic(affine_repo, make_failing_model(tmp_path / "failing.onnx"))
    server = live_server_factory(affine_repo.root, admin_token="t", guard_interval_s=0.2)
    events = run_canary(server, affine_repo, 2)
    assert events[-1]["action"] == "rollback" and "error rate 100.00%" in events[-1]["reason"]
    assert affine_repo.config("affine").traffic.weights == {"1": 100}
    assert 'leanserve_rollout_rollbacks_total{model="affine"} 1.0' in httpx.get(server.url + "/metrics").text


def test_canary_needs_a_primary_and_an_existing_version(affine_repo):
    with pytest.raises(InvalidInput, match="needs another version"):
        start_rollout(affine_repo, "affine", 1)
    with pytest.raises(InvalidInput, match="has no version 7"):
        start_rollout(affine_repo, "affine", 7)


def test_canary_command_starts_a_persisted_rollout(affine_repo, affine_onnx, capsys):
    from leanserve.cli import main

    affine_repo.add(affine_onnx, "affine")
    assert main(["canary", "affine", "2", "--steps", "10,100", "--interval", "30", "--repo", str(affine_repo.root)]) == 0
    rollout = affine_repo.config("affine").rollout
    assert (rollout.canary, rollout.primary, rollout.steps) == (2, 1, (10, 100))
    assert affine_repo.config("affine").traffic.weights == {"1": 90, "2": 10}
    assert "guarded canary of version 2" in capsys.readouterr().out
