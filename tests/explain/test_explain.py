"""Explanations on a real server: attributions that find the features and pixels a model uses, add up
where the method promises it, hide features behind the version's reference data, refuse clearly what
cannot be explained, and never block inference. Token models are in test_tokens.py."""

from __future__ import annotations

import threading

import grpc
import httpx
import numpy as np
import pytest
import torch

from conftest import LiveServer, make_affine_model, make_string_model, wait_until
from leanserve import Repository
from leanserve.explain import ExplainConfig
from leanserve.explain.worker import prepare
from leanserve.serve.protocol import grpc_predict_v2_pb2 as pb
from leanserve.serve.protocol import grpc_predict_v2_pb2_grpc as pb_grpc

pytest.importorskip("shap")
pytest.importorskip("captum")

DRIVER = 7  # the one feature that decides the tabular model's label
FEATURES = 30
REFERENCE_IMAGES = 500
SHAP_METHODS = ["permutation", "partition", "kernel"]


def _register_with_source(repo: Repository, module, example: np.ndarray, name: str, input_name: str, folder):
    from leanserve.from_torch import export
    from leanserve.torch_source import save_source

    onnx_path = folder / f"{name}.onnx"
    export(module, torch.from_numpy(example), onnx_path, input_names=[input_name], output_names=["logits"])
    source = save_source(module, torch.from_numpy(example), folder)
    return repo.add(onnx_path, name, attachments=[source])


def _tabular_mlp(x: np.ndarray, y: np.ndarray):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(inputs), labels).backward()
        optimizer.step()
    return module.eval()


@pytest.fixture(scope="module")
def tabular_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, FEATURES)).astype(np.float32)
    return x, (x[:, DRIVER] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def explain_repo(tmp_path_factory, digits, digits_teacher, tabular_rows):
    """credit: tabular MLP with source and reference profile; digits: the CNN with source and a reference
    profile of 500 training images; affine: ONNX only (no source, no profile); strings: a BYTES input
    nothing can attribute to."""
    from leanserve.monitor.reference import build_reference

    folder = tmp_path_factory.mktemp("explain")
    repo = Repository(folder / "repo")
    x, y = tabular_rows
    _register_with_source(repo, _tabular_mlp(x, y), x[:4], "credit", "features", folder)
    build_reference(repo, "credit", 1, {"features": x[:1000]})  # SHAP's background comes from it
    _register_with_source(repo, digits_teacher, digits[1][:4], "digits", "image", folder)
    build_reference(repo, "digits", 1, {"image": digits[0][:REFERENCE_IMAGES]})  # its mean image is the background
    repo.add(make_affine_model(folder / "affine.onnx"), "affine")
    repo.add(make_string_model(folder / "strings.onnx"), "strings")
    threads = torch.get_num_threads()
    for method in SHAP_METHODS:
        prepare(method)  # SHAP's one-off Numba compilation, outside the timed requests
    prepare("integrated_gradients")  # sets PyTorch's process-wide threads for explanations
    yield repo
    torch.set_num_threads(threads)  # as the tests after these expect


@pytest.fixture(scope="module")
def server(explain_repo):
    # one worker, no queue: a second concurrent explanation is refused
    live = LiveServer(explain_repo.root, explain=ExplainConfig(workers=1, max_queue=0, sample_interval_s=None)).start()
    yield live
    live.stop()


def _body(name: str, array: np.ndarray, **parameters) -> dict:
    return {"inputs": [{"name": name, "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}],
            "parameters": parameters}


def _attribution(response: httpx.Response, name: str) -> tuple[np.ndarray, dict]:
    assert response.status_code == 200, response.text
    tensor = next(o for o in response.json()["outputs"] if o["name"] == f"{name}__attribution")
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"]), tensor["parameters"]


def _floats(text: str) -> np.ndarray:
    return np.asarray([float(v) for v in text.split(",")])


# partition and kernel cost 0.2-0.6 s per tabular row here (SHAP's own Python per coalition): fewer rows
@pytest.mark.parametrize("method, rows, background", [
    ("permutation", 32, "reference_sample:32"),
    ("partition", 8, "reference_sample:32"),
    ("kernel", 8, "reference_sample:32"),
    ("integrated_gradients", 32, "reference_sample:32_mean"),
])
def test_the_feature_that_drives_the_label_ranks_first(server, tabular_rows, method, rows, background):
    x = tabular_rows[0][1000:1000 + rows]
    response = httpx.post(f"{server.url}/v2/models/credit/explain", json=_body("features", x, explain_method=method), timeout=60)
    values, params = _attribution(response, "features")
    assert values.shape == x.shape and params["explain_method"] == method
    assert params["explain_background"] == background and "explain_background_fallback" not in params
    importance = np.abs(values).mean(axis=0)
    ranking = np.argsort(importance)[::-1]
    assert ranking[0] == DRIVER
    assert importance[DRIVER] > 3 * importance[ranking[1]]


@pytest.mark.parametrize("method", ["permutation", "integrated_gradients"])
def test_digit_attributions_against_a_black_background_concentrate_on_the_ink(server, digits, method):
    images = digits[1][:3]
    body = _body("image", images, explain=True, explain_method=method, explain_background="zeros")
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=60)
    values, params = _attribution(response, "image")
    assert values.shape == images.shape and params["explain_method"] == method
    assert params["explain_background"] == "zeros" and "explain_background_fallback" not in params
    for image, attribution in zip(images, values, strict=True):
        stroke = image.ravel() > 0.5  # the pen's core; the upscaled digits' blurred edges are not counted
        top = np.argsort(np.abs(attribution.ravel()))[::-1][:40]  # the 5% of pixels that matter most
        overlap, chance = stroke[top].mean(), stroke.mean()
        assert overlap >= 0.8 and overlap > 2 * chance, (overlap, chance)
        positive = np.clip(attribution.ravel(), 0, None)
        assert positive[stroke].sum() > 0.6 * positive.sum()


def _logits(server, image: np.ndarray) -> np.ndarray:
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=_body("image", image[None]), timeout=30)
    return np.asarray(response.json()["outputs"][0]["data"]).reshape(-1)


@pytest.mark.parametrize("background", ["zeros", "reference"])
def test_attributions_sum_to_the_output_minus_the_baseline_output(server, digits, background):
    images = digits[1][3:5]
    # the baseline: the black image, or the mean of the images the reference profile was built from
    baseline = np.zeros_like(images[0]) if background == "zeros" else digits[0][:REFERENCE_IMAGES].mean(axis=0)
    baseline_logits = _logits(server, baseline.astype(np.float32))
    for method, tolerance in (("integrated_gradients", 0.05), *((m, 1e-3) for m in SHAP_METHODS)):
        body = _body("image", images, explain_method=method, explain_background=background)
        values, params = _attribution(httpx.post(f"{server.url}/v2/models/digits/explain", json=body, timeout=60), "image")
        assert params["explain_background"] == ("zeros" if background == "zeros" else "reference_mean")
        gain = _floats(params["output_value"]) - _floats(params["baseline_output"])
        targets = _floats(params["explained_target"]).astype(int)
        assert np.allclose(_floats(params["baseline_output"]), baseline_logits[targets], atol=1e-3), method
        sums = values.reshape(len(images), -1).sum(axis=1)
        assert np.all(np.abs(sums - gain) <= tolerance * np.abs(gain) + 1e-3), (method, sums, gain)
        assert params["completeness_gap"] <= tolerance * np.abs(gain).max() + 1e-3


def test_the_reference_mean_image_hides_pixels_and_attributions_follow_the_difference_from_it(server, digits):
    image = digits[1][5:6]
    mean = digits[0][:REFERENCE_IMAGES].mean(axis=0)
    values, params = _attribution(httpx.post(f"{server.url}/v2/models/digits/explain", json=_body("image", image), timeout=60),
                                  "image")
    assert params["explain_method"] == "integrated_gradients"  # the default where the version keeps its source
    assert params["explain_background"] == "reference_mean"
    values, params = _attribution(httpx.post(f"{server.url}/v2/models/digits/explain",
                                             json=_body("image", image, explain_method="permutation"), timeout=60), "image")
    assert params["explain_background"] == "reference_mean"
    # a pixel equal to the average image's is never hidden-and-changed: it takes no credit, whatever it shows
    difference = np.abs(image[0] - mean).ravel()
    same = difference < 1e-6
    assert np.all(values.ravel()[same] == 0)
    top = np.argsort(np.abs(values.ravel()))[::-1][:40]
    assert np.median(difference[top]) > np.median(difference)  # credit goes where the image departs from the mean


def test_without_reference_data_the_background_is_zeros_and_the_response_says_why(server):
    x = np.asarray([[5.0, 0.0, 1.0, 0.0]], np.float32)
    response = httpx.post(f"{server.url}/v2/models/affine/explain", json=_body("x", x, explain_method="kernel"), timeout=30)
    values, params = _attribution(response, "x")
    assert params["explain_background"] == "zeros"
    assert "no reference profile" in params["explain_background_fallback"]
    assert np.allclose(values, [[10.0, 0.0, 0.0, 0.0]], atol=1e-6)  # y0 = 2 x0 + 1 against x0 = 0


def test_an_embedding_is_explained_by_its_similarity_to_itself(server):
    x = np.asarray([[3.0, -1.0, 2.0, 0.5]], np.float32)
    body = _body("x", x, explain_method="permutation", explain_score="similarity", explain_output="y")
    values, params = _attribution(httpx.post(f"{server.url}/v2/models/affine/explain", json=body, timeout=30), "x")
    assert params["explained_score"] == "cosine_similarity" and params["explained_target"] == "-1"
    assert _floats(params["output_value"]) == pytest.approx([1.0])
    gain = _floats(params["output_value"]) - _floats(params["baseline_output"])
    assert values.sum() == pytest.approx(gain[0], abs=1e-5)


_ROW = np.ones((1, 4), np.float32)


@pytest.mark.parametrize("path, body, status, message", [
    ("nope/explain", _body("x", _ROW), 404, "unknown model 'nope'"),
    ("affine/explain", _body("x", _ROW, explain_method="integrated_gradients"), 400,
     "needs the PyTorch source of affine:1, which it does not have"),
    ("affine/explain", _body("x", _ROW, explain_method="lime"), 400,
     "explain_method must be one of permutation, partition, kernel, integrated_gradients, got 'lime'"),
    ("affine/explain", _body("x", _ROW, explain_score="logit"), 400, "explain_score must be one of column, similarity"),
    ("affine/explain", _body("x", _ROW, explain_background="noise"), 400, "explain_background must be one of reference, zeros"),
    ("affine/explain", _body("x", _ROW, explain_mask_token=103), 400, "explain_mask_token applies to token models"),
    ("affine/explain", _body("x", _ROW, explain_output="s", explain_score="similarity"), 400,
     "output 's' has one value per row: explain_score similarity needs several"),
    ("credit/explain", _body("features", np.ones((1, FEATURES), np.float32), explain_method="integrated_gradients",
                             explain_score="similarity"), 400,
     "integrated_gradients cannot explain the similarity score"),
    ("strings/explain", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}, 400,
     "input (text BYTES) cannot be explained: attributions need one floating-point input"),
])
def test_what_cannot_be_explained_is_a_clear_client_error(server, path, body, status, message):
    response = httpx.post(f"{server.url}/v2/models/{path}", json=body, timeout=30)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_an_explanation_over_its_budget_is_a_timeout_that_says_so(server, digits):
    body = _body("image", digits[1][:1], explain_method="permutation", explain_permutations=32, explain_timeout_ms=1)
    response = httpx.post(f"{server.url}/v2/models/digits/explain", json=body, timeout=60)
    assert response.status_code == 504
    assert "budget of 1 ms" in response.json()["error"]


def test_a_full_pool_answers_503_with_retry_after_while_inference_keeps_answering(server, digits):
    image = digits[1][:1]
    slow = _body("image", image, explain_method="permutation", explain_permutations=32, explain_timeout_ms=4000)
    results = []
    worker = threading.Thread(target=lambda: results.append(
        httpx.post(f"{server.url}/v2/models/digits/explain", json=slow, timeout=60)))
    worker.start()
    service = server.server.explanations
    wait_until(lambda: service.pending == 1, what="the slow explanation to take the only slot")
    refused = httpx.post(f"{server.url}/v2/models/digits/explain", json=_body("image", image), timeout=30)
    answered = httpx.post(f"{server.url}/v2/models/digits/infer", json=_body("image", image), timeout=30)
    still_busy = service.pending == 1
    worker.join(timeout=60)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "explanation pool is full" in refused.json()["error"]
    assert answered.status_code == 200 and [o["name"] for o in answered.json()["outputs"]] == ["logits"]
    assert still_busy  # inference answered while the explanation was still running
    assert results[0].status_code in (200, 504)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'leanserve_explain_rejected_total{model="digits"}' in metrics


def test_grpc_asks_through_request_parameters(server, tabular_rows):
    x = tabular_rows[0][1100:1102]
    request = pb.ModelInferRequest(model_name="credit")
    request.inputs.add(name="features", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request.parameters["explain"].bool_param = True
    request.parameters["explain_method"].string_param = "integrated_gradients"
    with grpc.insecure_channel(server.grpc_url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    names = [o.name for o in reply.outputs]
    assert names == ["logits", "features__attribution"]
    tensor = reply.outputs[1]
    assert list(tensor.shape) == [2, FEATURES]
    assert tensor.parameters["explain_method"].string_param == "integrated_gradients"
    values = np.frombuffer(reply.raw_output_contents[1], dtype=np.float32).reshape(2, FEATURES)
    assert np.abs(values).mean(axis=0).argmax() == DRIVER


def test_live_traffic_builds_global_importance_and_shows_attribution_drift(explain_repo):
    config = ExplainConfig(sample_interval_s=0.0, reference_samples=4, window_samples=4)
    live = LiveServer(explain_repo.root, explain=config).start()
    try:
        def send(row: list[float]) -> None:
            x = np.asarray([row], np.float32)
            assert httpx.post(f"{live.url}/v2/models/affine/infer", json=_body("x", x), timeout=30).status_code == 200

        def summary():
            doc = httpx.get(f"{live.url}/v2/monitor/models/affine", timeout=30).json()
            return doc["versions"]["1"]["explanations"]

        def sampled(row: list[float], done):
            send(row)  # each request is sampled when the pool is idle (interval 0 here)
            current = summary()
            return current if current and done(current) else None

        # y = 2x + 1: the largest output column is the largest input's, and only that input moves it
        before = wait_until(lambda: sampled([5.0, 0.0, 0.0, 0.0], lambda s: s["samples"] >= 4), timeout_s=60,
                            what="reference explanations")
        assert before["method"] == "permutation" and before["top_features"][0]["feature"] == 0
        assert before["shape"] == [4] and before["importance"][0] == pytest.approx(1.0)
        after = wait_until(lambda: sampled([0.0, 0.0, 0.0, 5.0], lambda s: s["drift"] is not None and s["drift"] > 0.9),
                           timeout_s=60, what="a window of shifted traffic")
        assert after["drifted"] and after["top_features"][0]["feature"] in (0, 3)
        assert after["history"] and after["history"][-1]["drift"] == after["drift"]
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'leanserve_attribution_drift{model="affine",version="1"}' in metrics
        assert 'origin="sample"' in metrics and 'outcome="success"' in metrics
    finally:
        live.stop()


def test_shap_still_names_the_permutation_explainer(server):
    x = np.asarray([[5.0, 0.0, 1.0, 0.0]], np.float32)
    response = httpx.post(f"{server.url}/v2/models/affine/explain", json=_body("x", x, explain_method="shap"), timeout=30)
    values, params = _attribution(response, "x")
    assert params["explain_method"] == "permutation"
    assert np.allclose(values, [[10.0, 0.0, 0.0, 0.0]], atol=1e-6)
