"""Delayed labels over HTTP: joined by request id, turned into live quality per version."""

import httpx
import orjson
import pytest

from conftest import wait_until

BODY = lambda rid, x: orjson.dumps({"id": rid, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]})  # noqa: E731


@pytest.fixture
def server(affine_repo, live_server_factory):
    return live_server_factory(affine_repo.root)


def feedback(server, items, model="affine"):
    return httpx.post(f"{server.url}/v2/models/{model}/feedback", content=orjson.dumps({"feedback": items}), timeout=10)


def logged(server, n):
    return server.server.prediction_log.count("affine") >= n


def test_feedback_is_joined_and_live_accuracy_is_exported(server):
    # y = 2x + 1: the arg-max of the first output is the largest x; label 3 is right, label 0 wrong.
    for i, label in enumerate([3, 3, 3, 0]):
        assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY(f"r{i}", [0, 1, 2, 9])).status_code == 200
    wait_until(lambda: logged(server, 4), what="samples logged")
    response = feedback(server, [{"id": f"r{i}", "label": label} for i, label in enumerate([3, 3, 3, 0])])
    assert response.status_code == 200 and response.json() == {"accepted": 4, "unknown": [], "duplicate": []}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_live_quality{metric="accuracy",model="affine",version="1"} 0.75' in metrics
    assert 'leanserve_labelled_samples{model="affine",version="1"} 4.0' in metrics


def test_unknown_and_duplicate_ids_are_reported(server):
    httpx.post(server.url + "/v2/models/affine/infer", content=BODY("known", [1, 2, 3, 4]))
    wait_until(lambda: logged(server, 1), what="sample logged")
    mixed = feedback(server, [{"id": "known", "label": 3}, {"id": "ghost", "label": 1}])
    assert mixed.status_code == 200 and mixed.json()["unknown"] == ["ghost"]
    again = feedback(server, [{"id": "known", "label": 3}])
    assert again.status_code == 400 and "already labelled ['known']" in again.json()["error"]


@pytest.mark.parametrize("body, message", [
    (b"{", "not valid JSON"),
    (orjson.dumps({"labels": []}), "feedback body must be"),
    (orjson.dumps({"feedback": [{"id": 5, "label": 1}]}), "needs an 'id' string"),
    (orjson.dumps({"feedback": [{"id": "a", "label": "cat"}]}), "label must be a number"),
    (orjson.dumps({"feedback": [{"id": str(i), "label": 1} for i in range(10_001)]}), "at most 10000"),
])
def test_malformed_feedback_is_refused_and_inference_is_unaffected(server, body, message):
    response = httpx.post(server.url + "/v2/models/affine/feedback", content=body, timeout=10)
    assert response.status_code == 400 and message in response.json()["error"]
    assert httpx.post(server.url + "/v2/models/affine/infer", content=BODY("after", [1, 2, 3, 4])).status_code == 200


def test_feedback_for_an_unknown_model_is_404(server):
    assert feedback(server, [{"id": "x", "label": 1}], model="nope").status_code == 404


def test_monitoring_can_be_turned_off(affine_repo, live_server_factory):
    server = live_server_factory(affine_repo.root, monitor=False)
    response = feedback(server, [{"id": "x", "label": 1}])
    assert response.status_code == 503 and "monitoring is off" in response.json()["error"]


def test_feedback_command_sends_json_lines(server, tmp_path, capsys):
    from leanserve.cli import main

    httpx.post(server.url + "/v2/models/affine/infer", content=BODY("cli-1", [0, 1, 2, 9]))
    wait_until(lambda: logged(server, 1), what="sample logged")
    (tmp_path / "labels.jsonl").write_text('{"id": "cli-1", "label": 3}\n{"id": "ghost", "label": 1}\n')
    assert main(["feedback", "affine", "--file", str(tmp_path / "labels.jsonl"), "--url", server.url]) == 0
    assert "accepted 1 labels; unknown ids: 1" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["feedback", "affine", "--file", str(tmp_path / "bad.jsonl"), "--url", server.url]) == 1
    assert "bad.jsonl:1: not a JSON object" in capsys.readouterr().err


def test_feedback_over_grpc(server):
    import grpc

    from leanserve.serve.protocol import leanserve_monitor_pb2 as pb
    from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as pb_grpc

    httpx.post(server.url + "/v2/models/affine/infer", content=BODY("g-1", [0, 1, 2, 9]))
    wait_until(lambda: logged(server, 1), what="sample logged")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.MonitoringStub(channel)
        reply = stub.Feedback(pb.FeedbackRequest(model_name="affine", items=[
            pb.FeedbackItem(id="g-1", class_label=3), pb.FeedbackItem(id="nobody", class_label=1)]))
        assert reply.accepted == 1 and list(reply.unknown) == ["nobody"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(pb.FeedbackRequest(model_name="affine", items=[pb.FeedbackItem(id="x")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "class_label or value" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(pb.FeedbackRequest(model_name="nope", items=[pb.FeedbackItem(id="x", class_label=1)]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
