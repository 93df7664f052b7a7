"""Guarded rollout: the judgement alone, and a real server that promotes a good canary and rolls back a slow one."""

import threading

import httpx
import numpy as np
import orjson
import pytest

from conftest import make_failing_model, wait_until
from leanserve.config import RolloutConfig, TrafficConfig
from leanserve.errors import InvalidInput
from leanserve.monitor.live import window_stats
from leanserve.monitor.quality import QualityCounts, accuracy_counts
from leanserve.monitor.rollout import Verdict, judge, rate_difference_bounds
from leanserve.traffic import read_events, start_rollout

CONFIG = RolloutConfig(canary=2, primary=1, step_interval_s=10, min_requests=50)


def window(requests, errors=0, latency_ms=1.0, seed=0):
    """A window of ``requests`` with ``errors`` failures and latencies around ``latency_ms`` (lognormal)."""
    rng = np.random.default_rng(seed)
    ok = np.ones(requests, bool)
    ok[:errors] = False
    return window_stats(latency_ms * rng.lognormal(0, 0.2, requests), ok, 60.0)


PRIMARY = window(4000, seed=1)


def test_identical_windows_advance_with_the_evidence_in_the_reason():
    verdict = judge(CONFIG, window(600), PRIMARY, 30, QualityCounts(970, 1000), QualityCounts(1940, 2000))
    assert verdict.action == "advance"
    assert "error rate 0.00% (0/600) vs primary 0.00% (0/4000)" in verdict.reason
    assert "accuracy 97.00% (970/1000) vs primary 97.00% (1940/2000)" in verdict.reason
    assert "0 of 600 canary requests over the allowed" in verdict.reason


def test_identical_windows_that_are_too_small_to_prove_anything_hold_not_roll_back():
    # the repro: a byte-identical copy, 32 labelled samples with 2 wrong (0.9375 vs 0.9745)
    verdict = judge(CONFIG, window(120), PRIMARY, 30, QualityCounts(30, 32), QualityCounts(1949, 2000))
    assert verdict.action == "hold"
    assert verdict.reason.startswith("holding: canary has 32 of 100 labelled samples needed; error rate 0.00% (0/120)")


def test_a_step_is_held_until_its_interval_has_passed():
    verdict = judge(CONFIG, window(600), PRIMARY, 4)
    assert verdict.action == "hold" and verdict.reason.startswith("holding: 4 of 10 s at this step; error rate")


def test_too_few_requests_hold_with_the_counts():
    verdict = judge(CONFIG, window(12), window(30), 30)
    assert verdict == Verdict("hold", "holding: canary has 12 of 50 requests needed; primary has 30 of 50 requests needed")


def test_a_zero_error_rate_needs_enough_requests_to_be_shown_within_the_margin():
    verdict = judge(CONFIG, window(100), PRIMARY, 30)
    assert verdict.action == "hold" and "straddle the allowed 1.00" in verdict.reason


def test_clearly_worse_accuracy_is_rolled_back_naming_the_test():
    verdict = judge(CONFIG, window(600), PRIMARY, 30, QualityCounts(880, 1000), QualityCounts(1940, 2000))
    assert verdict.action == "rollback"
    assert verdict.reason.startswith("accuracy 88.00% (880/1000) vs primary 97.00% (1940/2000): drop +9.00 points")
    assert "above the allowed 1.50 (Newcombe-Wilson)" in verdict.reason


def test_a_small_accuracy_difference_holds_until_the_interval_excludes_the_margin():
    verdict = judge(CONFIG, window(600), PRIMARY, 30, QualityCounts(190, 200), QualityCounts(1940, 2000))
    assert verdict.action == "hold" and "straddle the allowed 1.50" in verdict.reason


def test_a_higher_error_rate_is_rolled_back():
    verdict = judge(CONFIG, window(400, errors=20), PRIMARY, 30)
    assert verdict.action == "rollback" and verdict.reason.startswith("error rate 5.00% (20/400)")


def test_a_slower_tail_is_rolled_back_by_the_binomial_test():
    verdict = judge(CONFIG, window(400, latency_ms=5.0), PRIMARY, 30)
    assert verdict.action == "rollback" and "canary requests over the allowed" in verdict.reason
    assert "binomial p=" in verdict.reason


def test_a_tail_within_the_slack_advances():
    assert judge(CONFIG, window(600, latency_ms=2.0), PRIMARY, 30).action == "advance"  # x2, within +2 ms


def test_judge_rolls_back_a_canary_that_disagreed_as_shadow():
    verdict = judge(CONFIG, window(600), PRIMARY, 30, shadow_agreement=0.80)
    assert verdict.action == "rollback" and "agreed with the primary on 80.0%" in verdict.reason
    assert judge(CONFIG, window(600), PRIMARY, 30, shadow_agreement=0.99).action == "advance"


@pytest.mark.parametrize("counts, expected", [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090))])
def test_rate_difference_bounds_match_newcombes_published_intervals(counts, expected):
    # Newcombe (1998), Statistics in Medicine 17:873, table II, method 10; each end one-sided at 97.5%
    _, low, high = rate_difference_bounds(*counts, 0.975)
    assert (round(low, 4), round(high, 4)) == expected


def test_rate_difference_bounds_stay_sensible_at_zero_counts():
    d, low, high = rate_difference_bounds(0, 300, 0, 3000, 0.95)
    assert d == 0 and -0.01 < low < 0 < high < 0.01


def test_accuracy_counts_come_from_labelled_log_rows():
    rows = [{"version": 1, "label": 1, "outputs": {"y": [[0.1, 0.9]]}},
            {"version": 1, "label": 0, "outputs": {"y": [[0.2, 0.8]]}},
            {"version": 2, "label": 0, "outputs": {"y": [[0.7, 0.3]]}},
            {"version": 3, "label": 0.5, "outputs": {"y": [[0.4]]}}]
    assert accuracy_counts(rows) == {1: QualityCounts(1, 2), 2: QualityCounts(1, 1)}


@pytest.mark.parametrize("field, value, expected", [
    ("step_interval_s", "a", "rollout.step_interval_s: expected a positive number of seconds, got 'a'"),
    ("max_p99_ratio", None, "rollout.max_p99_ratio: expected a ratio of at least 1, got None"),
    ("confidence", 1.0, "rollout.confidence: expected a probability from 0.5 to 0.999, got 1.0"),
    ("min_quality_samples", 0, "rollout.min_quality_samples: expected a positive integer, got 0"),
    ("min_requests", True, "rollout.min_requests: expected a positive integer, got True"),
    ("max_quality_drop", float("nan"), "rollout.max_quality_drop: expected a fraction from 0 to 1, got nan"),
    ("steps", 5, "rollout.steps: expected increasing percentages between 1 and 100, got 5"),
])
def test_rollout_settings_are_refused_naming_the_field(field, value, expected):
    with pytest.raises(InvalidInput) as error:
        RolloutConfig(canary=2, primary=1, **{field: value})
    assert str(error.value) == expected


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


@pytest.mark.parametrize("settings, field", [({"step_interval_s": "a"}, "rollout.step_interval_s"),
                                             ({"max_p99_ratio": None}, "rollout.max_p99_ratio")])
def test_admin_canary_with_a_mistyped_setting_is_a_400_naming_it(affine_repo, affine_onnx, live_server_factory, settings, field):
    affine_repo.add(affine_onnx, "affine")
    server = live_server_factory(affine_repo.root, admin_token="t")
    response = httpx.post(server.url + "/v2/admin/models/affine/canary", headers={"Authorization": "Bearer t"},
                          json={"version": 2, **settings})
    assert response.status_code == 400 and field in response.text
    assert not affine_repo.config("affine").rollout.active
