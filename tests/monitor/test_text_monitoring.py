"""Monitoring text models: the log keeps the text itself, drift watches what the model made of it (its
embedding or probabilities, token counts), never padded token ids; feedback by request id gives a text
classifier its live accuracy."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

from conftest import wait_until
from leanserve.monitor.reference import build_reference, load_reference
from leanserve.monitor.watched import SEQUENCE_LENGTH, watched, watched_rows
from leanserve.repository import Repository
from text_support import make_bag_model, make_text_pipeline, make_tokenizer, sentences

pytest.importorskip("tokenizers")


@pytest.fixture
def text_repo(tmp_path):
    repo = Repository(tmp_path / "repo")
    repo.add(make_text_pipeline(tmp_path / "encoder", "embed"), "encoder")
    repo.add(make_text_pipeline(tmp_path / "reviews", "classify", labels=("négatif", "positif")), "reviews")
    folder = tmp_path / "tensors"
    folder.mkdir()
    repo.add(make_bag_model(folder / "model.onnx", "embed"), "encoder-tensors")
    return repo


def _infer_text(server, model: str, text: str, request_id: str) -> dict:
    body = {"id": request_id, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    answer = httpx.post(f"{server.url}/v2/models/{model}/infer", content=orjson.dumps(body), timeout=10)
    assert answer.status_code == 200, answer.text
    return {o["name"]: o["data"] for o in answer.json()["outputs"]}


def _tokens(tokenizer_path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.zeros_like(ids)}


def test_a_text_pipelines_reference_profiles_its_outputs_not_its_text(text_repo):
    texts, _ = sentences(200)
    profile = build_reference(text_repo, "encoder", 1, {"text": np.array(texts, dtype=object)})
    assert sorted(profile.names) == ["embedding", "token_count"]
    profile = build_reference(text_repo, "reviews", 1, {"text": np.array(texts, dtype=object)})
    assert sorted(profile.names) == ["probabilities", "token_count", "top_scores"]  # label names are not compared


def test_padded_token_ids_become_lengths_and_token_states_their_masked_mean(text_repo, tmp_path):
    signature = text_repo.get("encoder-tensors").signature
    tokenizer = make_tokenizer(tmp_path / "t.json")
    batch = _tokens(tokenizer, ["great food", "the staff was very friendly and the food was good"])  # padded to 12
    arrays = watched(signature, {**batch, "last_hidden_state": np.ones((2, 12, 8), np.float32)})
    assert sorted(arrays) == ["last_hidden_state.mean", SEQUENCE_LENGTH]
    assert arrays[SEQUENCE_LENGTH].tolist() == [4, 12]
    assert arrays["last_hidden_state.mean"].shape == (2, 8)
    # logged requests of different lengths stack as rows of the same watched tensors
    rows = [{**_tokens(tokenizer, [t]), "last_hidden_state": np.zeros((1, n, 8), np.float32)}
            for t, n in (("great food", 4), ("the food was great and very good", 9))]
    stacked = watched_rows(signature, rows)
    assert stacked[SEQUENCE_LENGTH].tolist() == [4, 9] and stacked["last_hidden_state.mean"].shape == (2, 8)


def test_drift_of_a_text_model_is_judged_on_its_embeddings_and_token_counts(text_repo, live_server_factory):
    reference, _ = sentences(400, seed=1)
    build_reference(text_repo, "encoder", 1, {"text": np.array(reference, dtype=object)})
    server = live_server_factory(text_repo.root, guard_interval_s=0.2)
    same, _ = sentences(150, seed=2)
    for i, text in enumerate(same):
        _infer_text(server, "encoder", text, f"same-{i}")
    wait_until(lambda: server.server.prediction_log.count("encoder") >= len(same), what="samples logged")
    wait_until(lambda: ("encoder", 1) in server.server.monitor.drift, what="a drift check")
    first = server.server.monitor.drift[("encoder", 1)]
    assert first["drifted"] is False, first
    rows = server.server.prediction_log.rows("encoder", 1, limit=1)
    assert bytes(rows[0]["inputs"]["text"][0]).decode() == same[-1]  # the log keeps the text itself
    # long all-positive reviews: other words, other lengths
    shifted = [" ".join(["great"] * 3 + ["loved", "the", "food"] * 3) for _ in range(300)]
    for i, text in enumerate(shifted):
        _infer_text(server, "encoder", text, f"shifted-{i}")

    def drifted():
        report = server.server.monitor.drift.get(("encoder", 1))
        return report if report and report["drifted"] and report["rows"] >= 300 else None

    report = wait_until(drifted, timeout_s=30, what="drift detected")
    assert any(f.startswith(("embedding", "token_count")) for f in report["features"]), report


def test_feedback_by_request_id_gives_a_text_classifier_its_live_accuracy(text_repo, live_server_factory):
    server = live_server_factory(text_repo.root)
    texts, labels = sentences(20, seed=3)
    for i, text in enumerate(texts):
        answer = _infer_text(server, "reviews", text, f"review-{i}")
        assert answer["label"] == [("négatif", "positif")[labels[i]]]  # non-ASCII label names are logged too
    wait_until(lambda: server.server.prediction_log.count("reviews") >= len(texts), what="samples logged")
    truth = labels.copy()
    truth[:5] = 1 - truth[:5]  # five of the twenty predictions are wrong
    items = [{"id": f"review-{i}", "label": int(label)} for i, label in enumerate(truth)]
    response = httpx.post(f"{server.url}/v2/models/reviews/feedback", content=orjson.dumps({"feedback": items}), timeout=10)
    assert response.status_code == 200 and response.json()["accepted"] == 20, response.text
    metrics = httpx.get(server.url + "/metrics").text
    assert 'leanserve_live_quality{metric="accuracy",model="reviews",version="1"} 0.75' in metrics
    # the monitor's slow round reads the labelled rows back from the log: the same accuracy
    version = wait_until(lambda: (v := httpx.get(server.url + "/v2/monitor/models/reviews").json()["versions"]["1"])
                         ["labelled"] == 20 and v, timeout_s=30, what="the labels round")
    assert version["accuracy"] == pytest.approx(0.75)
