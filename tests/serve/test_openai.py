"""POST /v1/embeddings checked with the openai package as the client, on a real server on loopback."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).parents[1] / "pipeline"))  # MiniLM's shared import and server

import minilm_support  # noqa: E402
from minilm_support import HELD_OUT, cosines  # noqa: E402


@pytest.fixture
def client():
    server = minilm_support.server()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_list_of_texts_gives_encode_s_embeddings_with_usage(client):
    answer = client.embeddings.create(model="minilm", input=HELD_OUT, encoding_format="float")
    vectors = np.array([d.embedding for d in answer.data])
    assert [d.index for d in answer.data] == list(range(len(HELD_OUT)))
    assert cosines(vectors, minilm_support.encoder()(HELD_OUT)).min() >= 0.9999
    assert answer.model == "minilm" and answer.usage.prompt_tokens == answer.usage.total_tokens > 4 * len(HELD_OUT)


def test_one_string_in_base64(client):
    raw = client.embeddings.with_raw_response.create(model="minilm", input=HELD_OUT[0], encoding_format="base64")
    data = raw.http_response.json()["data"]
    vector = np.frombuffer(base64.b64decode(data[0]["embedding"]), dtype="<f4")
    assert len(data) == 1 and vector.shape == (384,)
    assert cosines(vector[None], minilm_support.encoder()(HELD_OUT[:1]))[0] >= 0.9999
    # the client's own default (base64, decoded by the client) gives the same vector
    default = client.embeddings.create(model="minilm", input=HELD_OUT[0])
    assert np.allclose(default.data[0].embedding, vector, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"input": ""}, "empty text"),
    ({"input": "word " * 400}, "limit of 256 tokens"),
    ({"input": [[101, 102]]}, "token ids are not accepted"),
    ({"input": "x", "model": "minilm-tensors"}, "does not take text and return embeddings"),
])
def test_bad_requests_raise_the_client_s_bad_request_error(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.embeddings.create(**{"model": "minilm", **kwargs})
    assert len(client.embeddings.create(model="minilm", input="ok").data) == 1


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
