"""Feedback on a text classifier by label name: "positive" is mapped to its class index through the labels
of the version that answered the request (its pipeline's id2label), so live accuracy counts it like the
index; a name the version does not have is a 400 naming the labels it has, and nothing is recorded."""

from __future__ import annotations

import httpx
import orjson
import pytest

from conftest import wait_until
from leanserve.errors import InvalidInput
from leanserve.repository import Repository
from leanserve.serve.protocol.feedback import feedback_items
from text_support import make_text_pipeline, sentences

pytest.importorskip("tokenizers")

LABELS = ("négatif", "positif")


@pytest.fixture
def text_repo(tmp_path):
    repo = Repository(tmp_path / "repo")
    repo.add(make_text_pipeline(tmp_path / "reviews", "classify", labels=LABELS), "reviews")
    repo.add(make_text_pipeline(tmp_path / "encoder", "embed"), "encoder")
    return repo


def _answered(server, model: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        body = {"id": f"{model}-{i}", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
        assert httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=10).status_code == 200
    wait_until(lambda: server.server.prediction_log.count(model) >= len(texts), what="samples logged")


def _feedback(server, model: str, items: list[dict]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/feedback", content=orjson.dumps({"feedback": items}), timeout=10)


def test_labels_given_by_name_count_as_their_class_index(text_repo, live_server_factory):
    server = live_server_factory(text_repo.root)
    texts, labels = sentences(12, seed=4)
    _answered(server, "reviews", texts)
    truth = labels.copy()
    truth[:3] = 1 - truth[:3]  # three of the twelve predictions are wrong
    items = [{"id": f"reviews-{i}", "label": LABELS[label] if i % 2 else int(label)} for i, label in enumerate(truth)]
    response = _feedback(server, "reviews", items)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 12, "unknown": [], "duplicate": []}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_live_quality{metric="accuracy",model="reviews",version="1"} 0.75' in metrics


def test_an_unknown_label_name_is_a_400_naming_the_labels_and_records_nothing(text_repo, live_server_factory):
    server = live_server_factory(text_repo.root)
    texts, labels = sentences(4, seed=8)
    _answered(server, "reviews", texts)
    items = [{"id": f"reviews-{i}", "label": LABELS[label]} for i, label in enumerate(labels)]
    response = _feedback(server, "reviews", [*items[:3], {"id": "reviews-3", "label": "positive"}])
    assert response.status_code == 400
    message = response.json()["error"]
    assert "'positive' is not a class of reviews:1" in message and "'négatif', 'positif'" in message
    again = _feedback(server, "reviews", items)  # the refused call took none of its labels
    assert again.status_code == 200 and again.json()["accepted"] == 4, again.text


def test_a_label_name_for_a_model_without_classes_asks_for_a_number(text_repo, live_server_factory):
    server = live_server_factory(text_repo.root)
    _answered(server, "encoder", ["the food was great"])
    response = _feedback(server, "encoder", [{"id": "encoder-0", "label": "positif"}])
    assert response.status_code == 400 and "has no class names" in response.json()["error"]


def test_a_label_name_of_an_unknown_request_is_reported_unknown(text_repo, live_server_factory):
    server = live_server_factory(text_repo.root)
    _answered(server, "reviews", ["the food was great"])
    response = _feedback(server, "reviews", [{"id": "reviews-0", "label": "positif"}, {"id": "nobody", "label": "positif"}])
    assert response.status_code == 200 and response.json() == {"accepted": 1, "unknown": ["nobody"], "duplicate": []}


@pytest.mark.parametrize("label, message", [("", "class name of 0 characters"), ("x" * 300, "class name of 300"),
                                            ([1], "finite number (class index or true value) or a class name")])
def test_feedback_items_refuse_empty_overlong_and_other_labels(label, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        feedback_items([("r1", label)])
    assert feedback_items([("r1", "positif"), ("r2", 1)]) == [("r1", "positif"), ("r2", 1)]


def test_labels_given_by_name_over_grpc_match_rest(text_repo, live_server_factory):
    import grpc

    from leanserve.serve.protocol import leanserve_monitor_pb2 as pb
    from leanserve.serve.protocol import leanserve_monitor_pb2_grpc as pb_grpc

    server = live_server_factory(text_repo.root)
    texts, labels = sentences(6, seed=5)
    _answered(server, "reviews", texts)
    truth = labels.copy()
    truth[:3] = 1 - truth[:3]  # half the predictions are wrong
    items = [pb.FeedbackItem(id=f"reviews-{i}", class_name=LABELS[label]) for i, label in enumerate(truth)]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.MonitoringStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(pb.FeedbackRequest(model_name="reviews", items=[*items[:5], pb.FeedbackItem(id="reviews-5", class_name="positive")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'positive' is not a class of reviews:1" in err.value.details()
        reply = stub.Feedback(pb.FeedbackRequest(model_name="reviews", items=items))  # the refused call took none
        assert reply.accepted == 6 and not reply.unknown and not reply.duplicate
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_live_quality{metric="accuracy",model="reviews",version="1"} 0.5' in metrics
