"""Text in, embeddings out: MiniLM imported from its folder, served over REST (JSON and binary) and gRPC."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from leanserve.repository import Repository
from minilm_support import HELD_OUT, cosines
import minilm_support


@pytest.fixture
def minilm_repo():
    return minilm_support.repo()


@pytest.fixture
def minilm_folder():
    return minilm_support.folder()


@pytest.fixture
def minilm_server():
    return minilm_support.server()


@pytest.fixture
def encode():
    return minilm_support.encoder()


def test_one_command_imports_the_pipeline_and_the_tensor_model(minilm_repo):
    repo = Repository(minilm_repo, create=False)
    pipeline = repo.get("minilm")
    assert pipeline.manifest.format == "pipeline"
    assert {"pipeline.json", "model.onnx", "tokenizer.json"} <= set(pipeline.manifest.files)
    assert [s.describe() for s in pipeline.signature.inputs] == ["text BYTES [-1]"]
    assert pipeline.signature.output_names == ["embedding", "token_count"]
    assert pipeline.manifest.metrics["check_min_cosine"] >= 0.9999
    spec = json.loads((pipeline.path / "pipeline.json").read_text())
    assert spec["pre"]["max_length"] == 256 and spec["post"] == {"kind": "pool", "dimension": 384, "mode": "mean",
                                                                 "normalize": True}
    tensors = repo.get("minilm-tensors")
    assert tensors.signature.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(s.shape == (-1, -1) for s in tensors.signature.inputs)  # batch and sequence stay dynamic


def test_rest_json_strings_match_encode(minilm_server, encode):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(HELD_OUT)], "data": HELD_OUT}]}
    answer = httpx.post(minilm_server.url + "/v2/models/minilm/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    embedding = np.array(outputs["embedding"]["data"]).reshape(outputs["embedding"]["shape"])
    assert cosines(embedding, encode(HELD_OUT)).min() >= 0.9999
    assert outputs["token_count"]["data"][2] == 6  # [CLS] bring a jacket . [SEP]


def test_rest_binary_and_grpc_match_encode(minilm_server, encode):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    texts = np.array([t.encode() for t in HELD_OUT], dtype=object)
    expected = encode(HELD_OUT)
    http = triton_http.InferenceServerClient(minilm_server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=True)
    got = http.infer("minilm", [tensor], outputs=[triton_http.InferRequestedOutput("embedding", binary_data=True)])
    assert cosines(got.as_numpy("embedding"), expected).min() >= 0.9999
    grpc = triton_grpc.InferenceServerClient(minilm_server.grpc_url)
    tensor = triton_grpc.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts)
    assert cosines(grpc.infer("minilm", [tensor]).as_numpy("embedding"), expected).min() >= 0.9999


def test_the_tensor_model_serves_clients_that_tokenize(minilm_server, minilm_folder, encode):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_folder / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(HELD_OUT[:2])
    ids = np.array([e.ids for e in encoded])
    mask = np.array([e.attention_mask for e in encoded])
    body = {"inputs": [{"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
                       for n, a in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", 0 * ids))]}
    answer = httpx.post(minilm_server.url + "/v2/models/minilm-tensors/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    out = answer.json()["outputs"][0]
    hidden = np.array(out["data"]).reshape(out["shape"])
    pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    assert cosines(pooled, encode(HELD_OUT[:2])).min() >= 0.9999


def _binary_text(url: str, blob: bytes) -> httpx.Response:
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob) + 4}}]}).encode()
    return httpx.post(url + "/v2/models/minilm/infer", content=header + len(blob).to_bytes(4, "little") + blob,
                      headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)


@pytest.mark.parametrize("case, expected", [
    ("empty", "empty text"),
    ("utf8", "not valid UTF-8"),
    ("long", "limit of 256 tokens"),
    ("datatype", "expected datatype BYTES, got FP32"),
])
def test_bad_text_is_a_400_naming_the_problem_and_the_server_keeps_serving(minilm_server, case, expected):
    url = minilm_server.url
    if case == "utf8":
        answer = _binary_text(url, b"caf\xc3(")
    else:
        data = {"empty": ["fine", "  "], "long": ["word " * 400], "datatype": [1.0]}[case]
        datatype = "FP32" if case == "datatype" else "BYTES"
        answer = httpx.post(url + "/v2/models/minilm/infer", timeout=30, json={
            "inputs": [{"name": "text", "datatype": datatype, "shape": [len(data)], "data": data}]})
    assert answer.status_code == 400, answer.text
    assert expected in answer.json()["error"]
    assert _binary_text(url, "still serving".encode()).status_code == 200


def test_tokenize_returns_tokens_with_their_spans(minilm_server):
    answer = httpx.post(minilm_server.url + "/v2/models/minilm/tokenize", json={"text": ["Bring a jacket."]}, timeout=30)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["max_length"] == 256
    tokens = doc["tokens"][0]
    assert [t["text"] for t in tokens] == ["[CLS]", "bring", "a", "jacket", ".", "[SEP]"]
    assert tokens[3]["start"] == 8 and tokens[3]["stop"] == 14 and tokens[0]["special"]
    refused = httpx.post(minilm_server.url + "/v2/models/minilm-tensors/tokenize", json={"text": "x"}, timeout=30)
    assert refused.status_code == 400 and "takes no text" in refused.json()["error"]["message"]
