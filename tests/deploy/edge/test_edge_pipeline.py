"""`leanserve edge --target ort` on a text pipeline version: the inner model is quantized with int8 picked
on texts inside the version's own stages, converted to ORT format, run under the device profile on token
tensors, and registered as a pipeline again (pipeline.json pointing at model.ort, tokenizer byte for byte)
that loads and serves text. Other targets refuse pipeline versions in one line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge.build import REPORT_JSON
from leanserve.deploy.edge.ort_format import OPERATORS_FILE
from leanserve.runtime import load_session
from text_support import LABELS, make_text_pipeline, sentences

pytest.importorskip("tokenizers")


def _edge(capsys, *argv):
    status = main(["edge", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def text_edge(tmp_path_factory):
    """reviews:1 (the bag-of-words sentiment classifier with its tokenizer), then `leanserve edge` on texts."""
    folder = tmp_path_factory.mktemp("text-edge")
    repo = Repository(folder / "repo")
    repo.add(make_text_pipeline(folder / "reviews", "classify"), "reviews")
    texts, labels = sentences(120, seed=11)
    np.savez(folder / "eval.npz", text=np.array(texts), labels=labels)
    status = main(["edge", "reviews:1", "--target", "ort", "--eval", str(folder / "eval.npz"), "--max-accuracy-drop",
                   "2%", "--seconds", "0.1", "--time-budget", "120", "--repo", str(repo.root)])
    return repo, status


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_edge_version_of_a_text_pipeline_is_a_pipeline_around_model_ort(text_edge):
    repo, status = text_edge
    assert status == 0
    parent, edge = repo.get("reviews", 1), repo.get("reviews", 2)
    assert edge.manifest.format == "pipeline" and edge.signature == parent.signature
    spec = json.loads(edge.model_path.read_text())
    assert (spec["model_file"], spec["model_format"]) == ("model.ort", "ort")
    assert {"model.ort", "tokenizer.json", OPERATORS_FILE, REPORT_JSON} <= set(edge.manifest.files)
    assert "model.onnx" not in edge.manifest.files
    assert edge.manifest.files["tokenizer.json"] == parent.manifest.files["tokenizer.json"]
    assert _sha256(edge.path / "tokenizer.json") == _sha256(parent.path / "tokenizer.json")
    assert {k: v for k, v in spec.items() if k not in ("model_file", "model_format")} == \
        {k: v for k, v in json.loads(parent.model_path.read_text()).items() if k not in ("model_file", "model_format")}


def test_the_int8_pick_is_judged_on_texts_and_reported_on_held_out_texts(text_edge):
    repo, _ = text_edge
    edge = repo.get("reviews", 2)
    report = json.loads((edge.path / REPORT_JSON).read_text())
    assert report["int8"] and report["accuracy_checked"] and report["device"]["fits"]
    assert report["accuracy"]["metric"] == "top1" and report["accuracy"]["original"] == 1.0  # labels of the texts
    assert report["accuracy"]["drop"] <= report["accuracy"]["allowed_drop"]
    assert report["original_bytes"] == (repo.get("reviews", 1).path / "model.onnx").stat().st_size
    assert any("tokenizer.json" in note and "runs the tokenizer beside the model" in note for note in report["notes"])
    metrics = edge.manifest.metrics
    assert metrics["holdout_split"]["holdout_rows"] == 36 and "selection_top1" in metrics and "holdout_top1" in metrics


def test_the_edge_version_loads_and_answers_texts_with_label_names(text_edge):
    repo, _ = text_edge
    texts, labels = sentences(30, seed=12)
    session = load_session(repo.get("reviews", 2))
    try:
        answer = session.run({"text": np.array(texts, dtype=object)})
    finally:
        session.close()
    assert session.inner.engine == "onnxruntime"
    assert (answer["probabilities"].argmax(axis=1) == labels).mean() >= 0.9
    assert {str(label) for label in answer["label"]} <= set(LABELS)


def test_the_server_answers_text_with_the_edge_version_once_promoted(text_edge, live_server_factory):
    import httpx

    repo, _ = text_edge
    assert repo.state("reviews") == {1: "serving", 2: "registered"}  # an edge artifact is never served unasked
    repo.promote("reviews", 2)
    try:
        server = live_server_factory(repo.root)
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                            "data": ["the food was great", "service terrible and slow"]}]}
        response = httpx.post(server.url + "/v2/models/reviews/versions/2/infer", json=body, timeout=30)
    finally:
        repo.promote("reviews", 1)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == ["positive", "negative"]


def test_without_eval_texts_dynamic_int8_is_used_and_the_version_still_serves_text(tmp_path, capsys):
    repo = Repository(tmp_path / "repo")
    repo.add(make_text_pipeline(tmp_path / "encoder", "embed"), "encoder")
    status, out, err = _edge(capsys, "encoder", "--seconds", "0.1", "--repo", str(repo.root))
    assert status == 0, err
    assert "accuracy: **not checked**" in out and "registered encoder:2" in out
    edge = repo.get("encoder", 2)
    assert json.loads(edge.model_path.read_text())["model_format"] == "ort"
    original, converted = (load_session(repo.get("encoder", v)) for v in (1, 2))
    texts = np.array(["the food was great", "cold menu and slow staff"], dtype=object)
    a, b = original.run({"text": texts})["embedding"], converted.run({"text": texts})["embedding"]
    assert np.all(np.sum(a * b, axis=1) > 0.99)  # both normalized: the cosine


@pytest.mark.parametrize("target", ["executorch", "c"])
def test_other_targets_refuse_a_pipeline_version_naming_the_one_that_takes_it(tmp_path, capsys, target):
    repo = Repository(tmp_path / "repo")
    repo.add(make_text_pipeline(tmp_path / "reviews", "classify"), "reviews")
    status, _, err = _edge(capsys, "reviews:1", "--target", target, "--repo", str(repo.root))
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert f"--target {target} does not take pipeline versions" in err and "use --target ort" in err
    assert repo.versions("reviews") == [1]
