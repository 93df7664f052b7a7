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
    (orjson.dumps({"feedback": [{"id": "a", "label": ["cat"]}]}), "label must be a finite number"),
    (orjson.dumps({"feedback": [{"id": "a" * 257, "label": 1}]}), "at most 256 expected"),
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
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "feedback[0] label must be a finite number" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(pb.FeedbackRequest(model_name="nope", items=[pb.FeedbackItem(id="x", class_label=1)]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- abuse and accidents (issue 17) ----------------------------------------------------------------------

def infer(server, request_id=None, x=(0, 1, 2, 9)):
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": list(x)}]}
    if request_id is not None:
        doc["id"] = request_id
    response = httpx.post(server.url + "/v2/models/affine/infer", content=orjson.dumps(doc), timeout=10)
    assert response.status_code == 200
    return response.headers["x-request-id"]


def test_a_client_cannot_guess_another_clients_request_id(server):
    mine = [infer(server) for _ in range(100)]
    victim = infer(server)
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in mine + [victim])  # 128 random bits each
    assert len({rid[:8] for rid in mine}) == len(mine)  # no shared prefix, no counter to step along
    # The attack that worked on ids made of a process prefix and a counter: step from one's own newest id.
    newest = int(mine[-1], 16)
    guesses = [f"{newest + step:032x}" for step in range(-3, 4) if step] + [f"{int(victim, 16) ^ 1:032x}"]
    refused = feedback(server, [{"id": guess, "label": 0} for guess in guesses])
    assert refused.status_code == 400 and "no label accepted" in refused.json()["error"]
    assert feedback(server, [{"id": victim, "label": 3}]).json()["accepted"] == 1  # its owner's label still counts


def test_client_supplied_request_ids_are_kept(server):
    assert infer(server, "order-17") == "order-17"
    assert feedback(server, [{"id": "order-17", "label": 3}]).json()["accepted"] == 1


def test_with_a_feedback_token_feedback_without_it_is_refused(affine_repo, live_server_factory):
    import grpc

    from leanserve.serve.protocol import leanserve_monitor_pb2 as pb
    from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as pb_grpc

    server = live_server_factory(affine_repo.root, feedback_token="s3cret")
    rid = infer(server)  # inference itself needs no token
    body = orjson.dumps({"feedback": [{"id": rid, "label": 3}]})
    url = f"{server.url}/v2/models/affine/feedback"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        refused = httpx.post(url, content=body, headers=headers, timeout=10)
        assert refused.status_code == 401 and "feedback token" in refused.json()["error"]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.MonitoringStub(channel)
        request = pb.FeedbackRequest(model_name="affine", items=[pb.FeedbackItem(id=rid, class_label=3)])
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Feedback(request, metadata=[("authorization", "Bearer s3cret")]).accepted == 1
    assert server.server.prediction_log.count("affine") >= 1 and not feedback(server, [{"id": rid, "label": 3}]).is_success


def _unless_503(answer):
    return None if answer.status_code == 503 else answer


def test_feedback_sent_right_after_its_prediction_is_accepted(server):
    # The accident: samples reach the log in frames, so a label sent at once found no row (11 of 50).
    accepted = 0
    for i in range(50):
        rid = infer(server)
        # a writer starved past the wait says 503 + Retry-After (1 s), never "unknown id": send again then
        answer = wait_until(lambda: _unless_503(feedback(server, [{"id": rid, "label": 3}])), timeout_s=30,
                            interval_s=1.0, what="feedback answered other than 503")
        assert answer.status_code == 200, (i, answer.status_code, answer.text)
        accepted += answer.json()["accepted"]
    assert accepted == 50
    assert server.server.feedback.live_quality["affine"][1].labelled == 50


def test_feedback_spammers_do_not_make_the_server_reread_the_log(server):
    from concurrent.futures import ThreadPoolExecutor

    ids = [infer(server) for _ in range(160)]
    plog = server.server.prediction_log
    read_before = plog.stats.rows_read

    def spam(worker: int) -> int:
        with httpx.Client(timeout=10) as client:
            return sum(client.post(f"{server.url}/v2/models/affine/feedback",
                                   content=orjson.dumps({"feedback": [{"id": rid, "label": 3 if n % 4 else 0}]})).json()["accepted"]
                       for n, rid in enumerate(ids[worker::8]))

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(spam, range(8))) == 160
    assert plog.stats.rows_read == read_before  # no labelled row read back, whatever the number of calls
    counts = server.server.feedback.live_quality["affine"][1]
    assert (counts.correct, counts.labelled) == (120, 160)  # every fourth label (0) is wrong: x's arg-max is 3


def test_a_locked_log_answers_503_with_retry_after_and_the_labels_can_be_sent_again(server, monkeypatch):
    import sqlite3

    from leanserve.monitor import reader, writer

    rid = infer(server)
    wait_until(lambda: logged(server, 1), what="sample logged")
    monkeypatch.setattr(reader, "JOIN_WAIT_S", 0.2)
    _, newest = writer.segments(server.server.prediction_log.config.path)[-1]
    holder = sqlite3.connect(newest, timeout=5)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the segment's write lock
    try:
        busy = feedback(server, [{"id": rid, "label": 3}])
    finally:
        holder.rollback()
        holder.close()
    assert busy.status_code == 503 and "send the feedback again" in busy.json()["error"]
    assert busy.headers["retry-after"]
    again = feedback(server, [{"id": rid, "label": 3}])
    assert again.status_code == 200 and again.json()["accepted"] == 1


def test_live_quality_equals_the_quality_recomputed_from_the_log(server):
    from leanserve.monitor.quality import rolling_quality

    ids = [infer(server, x=x) for x in ([0, 1, 2, 9], [9, 1, 2, 0], [0, 9, 2, 1], [5, 1, 2, 3])]
    assert feedback(server, [{"id": rid, "label": 3} for rid in ids]).json()["accepted"] == 4
    from_log = rolling_quality(server.server.prediction_log.rows("affine", labelled=True))
    assert server.server.feedback.live_quality["affine"][1] == from_log[0].counts
    assert from_log[0].counts.correct == 1


@pytest.mark.parametrize("rest_items, grpc_items", [
    ([{"id": str(i), "label": 1} for i in range(10_001)], [dict(id=str(i), class_label=1) for i in range(10_001)]),
    ([{"id": "a"}], [dict(id="a")]),
    ([{"id": "", "label": 1}], [dict(id="", class_label=1)]),
    ([{"id": "a" * 300, "label": 1}], [dict(id="a" * 300, class_label=1)]),
])
def test_rest_and_grpc_refuse_the_same_call_with_the_same_message(server, rest_items, grpc_items):
    import grpc

    from leanserve.serve.protocol import leanserve_monitor_pb2 as pb
    from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as pb_grpc

    rest = feedback(server, rest_items)
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MonitoringStub(channel).Feedback(pb.FeedbackRequest(model_name="affine", items=[pb.FeedbackItem(**i) for i in grpc_items]))
    assert rest.status_code == 400 and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rest.json()["error"] == err.value.details()


def test_grpc_refuses_a_label_that_is_not_finite(server):
    import grpc

    from leanserve.serve.protocol import leanserve_monitor_pb2 as pb
    from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MonitoringStub(channel).Feedback(pb.FeedbackRequest(model_name="affine", items=[pb.FeedbackItem(id="a", value=float("nan"))]))
    assert "feedback[0] label must be a finite number" in err.value.details()


def test_feedback_while_the_writer_is_behind_is_a_503_not_an_unknown_id(server, monkeypatch):
    # A writer process starved past the wait cannot say whether the id exists yet: retry, not "unknown".
    plog = server.server.prediction_log
    monkeypatch.setattr(type(plog), "_unwritten", lambda self: True)
    monkeypatch.setattr(type(plog), "written_through", lambda self, timeout_s=5.0: False)
    answer = feedback(server, [{"id": "not-written-yet", "label": 3}])
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    assert "writer is more than 5 s behind" in answer.json()["error"]
