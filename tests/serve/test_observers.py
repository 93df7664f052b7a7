"""The serving core and what watches it: optional features are composed only when they are on, and a
request that does not ask for an explanation never reaches the explanation code."""

from __future__ import annotations

import httpx
import orjson
import pytest

from leanserve.config import ExplainConfig
from leanserve.server import build_server
from leanserve.serve.settings import ServerConfig

BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})


def composed(repo_root, **settings) -> set[str]:
    server = build_server(ServerConfig(repo=repo_root, grpc_port=None, **settings))
    try:
        return {type(o).__name__ for o in server.plane.observers}
    finally:
        if server.prediction_log is not None:
            server.prediction_log.close()


def test_monitoring_off_leaves_the_prediction_log_off_the_request_path(affine_repo):
    assert "PredictionLogObserver" in composed(affine_repo.root)
    assert "PredictionLogObserver" not in composed(affine_repo.root, monitor=False)


def test_explanation_sampling_is_off_by_default_and_composed_only_when_asked(affine_repo):
    assert ExplainConfig().sample_interval_s is None
    assert "ImportanceSampler" not in composed(affine_repo.root, monitor=False)
    on = composed(affine_repo.root, monitor=False, explain=ExplainConfig(sample_interval_s=5.0))
    assert "ImportanceSampler" in on


def test_requests_without_explain_never_reach_the_explanation_service(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, monitor=False)
    calls = []
    server.server.explanations.plan = lambda *args: calls.append(args)  # the service's entry point
    for _ in range(5):
        assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 200
    assert calls == []
    explained = httpx.post(server.url + "/v2/models/affine/infer",
                           content=orjson.dumps({**orjson.loads(BODY), "parameters": {"explain": True}}))
    assert explained.status_code == 200 and len(calls) == 1


def sample_count(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("leanserve_explanations_total{") and 'origin="sample"' in line)


def test_the_sampler_switch_turns_live_explanations_on(affine_repo, live_server_factory):
    pytest.importorskip("shap")
    off = live_server_factory(affine_repo.root, monitor=False)
    on = live_server_factory(affine_repo.root, monitor=False, explain=ExplainConfig(sample_interval_s=0.0))
    for server in (off, on):
        for _ in range(3):
            assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 200
    from conftest import wait_until

    wait_until(lambda: sample_count(on) >= 1, timeout_s=60, what="a live sample")
    assert sample_count(off) == 0


def test_the_sampler_stays_within_its_cpu_share(affine_repo, live_server_factory):
    pytest.importorskip("shap")
    # a share so small that one sample's CPU holds the next back for minutes, whatever the interval
    server = live_server_factory(affine_repo.root, monitor=False,
                                 explain=ExplainConfig(sample_interval_s=0.0, sample_cpu_share=1e-6))
    from conftest import wait_until

    assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 200
    wait_until(lambda: sample_count(server) >= 1, timeout_s=60, what="the first live sample")
    service = server.server.explanations
    wait_until(lambda: not service._tasks, timeout_s=30, what="the sample to finish")
    for _ in range(20):
        assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY).status_code == 200
    assert sample_count(server) == 1 and service.sample_cpu_s > 0


def test_a_sample_is_budgeted_by_its_wall_time_not_only_its_cpu(tmp_path, monkeypatch):
    """Under load a sample waits for cores and the GIL far longer than its thread computes, and competes with
    requests all that time: a sample that ran 0.2 s on almost no CPU still holds the next one back 0.2 s / share."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry

    from leanserve.explain.service import ExplanationService

    service = ExplanationService(None, CollectorRegistry(), ExplainConfig(sample_interval_s=0.0, sample_cpu_share=0.1,
                                                                          preload=False))

    async def waits(handle, plan, inputs):  # no CPU: the sample waits, as one starved of cores would
        await asyncio.sleep(0.2)

    monkeypatch.setattr(service, "explain", waits)
    started = time.monotonic()
    asyncio.run(service._sample(None, None, {}))
    assert service.sample_cpu_s == 0.0
    assert service._sample_not_before - started >= 0.2 / 0.1 * 0.95
    service.close()
