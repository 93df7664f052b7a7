"""Explanations of text pipeline versions: texts are explained per token of the version's own tokenizer,
and REST and gRPC answers carry the tokens as strings beside their attributions."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import LiveServer
from leanserve import Repository
from leanserve.explain import ExplainConfig
from leanserve.explain.worker import prepare
from text_support import make_text_pipeline

pytest.importorskip("shap")
pytest.importorskip("tokenizers")

TEXTS = ["the food was great", "slow service and the menu was cold"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-explain")
    repo = Repository(folder / "repo")
    repo.add(make_text_pipeline(folder / "reviews", "classify"), "reviews")
    repo.add(make_text_pipeline(folder / "encoder", "embed"), "encoder")
    prepare("permutation")
    live = LiveServer(repo.root, explain=ExplainConfig(workers=1, max_queue=0, sample_interval_s=None,
                                                        max_tokens=12)).start()
    yield live
    live.stop()


def _text_body(texts: list[str], **parameters) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "parameters": parameters}


def _explain(server, model: str, texts: list[str], **parameters) -> dict:
    response = httpx.post(f"{server.url}/v2/models/{model}/explain", json=_text_body(texts, **parameters), timeout=60)
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def test_rest_returns_each_token_as_a_string_beside_its_attribution(server):
    outputs = _explain(server, "reviews", TEXTS)
    values = np.asarray(outputs["text__attribution"]["data"]).reshape(outputs["text__attribution"]["shape"])
    tokens = np.asarray(outputs["text__tokens"]["data"], dtype=object).reshape(outputs["text__tokens"]["shape"])
    assert outputs["text__tokens"]["datatype"] == "BYTES" and tokens.shape == values.shape == (2, 9)
    assert tokens[0].tolist() == ["[CLS]", "the", "food", "was", "great", "[SEP]", "", "", ""]
    assert tokens[1, :3].tolist() == ["[CLS]", "slow", "service"] and tokens[1, -1] == "[SEP]"
    params = outputs["text__attribution"]["parameters"]
    assert params["explained_output"] == "probabilities" and params["explained_tokens"] == "text__tokens"
    assert params["explained_target"] == "1,0"  # positive for the first review, negative for the second
    # the word that decides each review's class carries the most weight; padding is not a player
    assert [tokens[i, np.argmax(np.abs(values[i]))] for i in range(2)] == ["great", "slow"]
    assert np.all(values[0, 6:] == 0)
    assert outputs["label"]["data"] == ["positive", "negative"]


def test_grpc_answers_tokens_beside_attributions(server):
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(server.grpc_url)
    tensor = triton_grpc.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"I loved it"], dtype=object))
    answer = client.infer("reviews", [tensor], parameters={"explain": True, "explain_method": "permutation"})
    tokens = answer.as_numpy("text__tokens")
    values = answer.as_numpy("text__attribution")
    assert tokens.shape == values.shape == (1, 5)
    assert [t.decode() for t in tokens[0]] == ["[CLS]", "i", "loved", "it", "[SEP]"]
    assert tokens[0, np.argmax(np.abs(values[0]))] == b"loved"


def test_a_sentence_encoder_is_explained_by_similarity_to_its_own_embedding(server):
    outputs = _explain(server, "encoder", ["great food"], explain_score="similarity")
    tokens = outputs["text__tokens"]["data"]
    assert tokens == ["[CLS]", "great", "food", "[SEP]"]
    values = np.asarray(outputs["text__attribution"]["data"])
    assert tokens[int(np.argmax(values))] == "great"  # the word with the largest vector dominates the mean
    assert outputs["text__attribution"]["parameters"]["explained_score"] == "cosine_similarity"


def test_a_text_over_the_explanation_token_limit_is_a_400_saying_the_limit(server):
    response = httpx.post(f"{server.url}/v2/models/reviews/explain", timeout=60,
                          json=_text_body(["the food was great and the staff was very friendly and i would come back"]))
    assert response.status_code == 400, response.text
    assert "explains at most 12 per row" in response.json()["error"]
