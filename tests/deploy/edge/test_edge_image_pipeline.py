"""`leanserve edge --target ort` on an image pipeline version (the digits CNN fed PNG bytes): the evaluation
data is a bytes array of PNGs, the int8 pick is judged on those images through the version's own image
stage, and the edge version answers PNG bytes with digit names, over HTTP once promoted."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge.build import REPORT_JSON
from leanserve.runtime import load_session

PIL = pytest.importorskip("PIL")
from image_support import NAMES, digits_image_pipeline, png  # noqa: E402


def _pngs(images: np.ndarray) -> list[bytes]:
    return [png(pixels) for pixels in np.round(images[:, 0] * 255).astype(np.uint8)]


@pytest.fixture(scope="module")
def image_edge(tmp_path_factory, digits_cnn_onnx, digits):
    folder = tmp_path_factory.mktemp("image-edge")
    repo = Repository(folder / "repo")
    repo.add(digits_image_pipeline(folder / "stage", digits_cnn_onnx), "digits")
    _, x_test, _, y_test = digits
    np.savez(folder / "eval.npz", image=np.array(_pngs(x_test[:200]), dtype=bytes), labels=y_test[:200])
    np.savez(folder / "objects.npz", image=np.array(_pngs(x_test[:4]), dtype=object), labels=y_test[:4])
    status = main(["edge", "digits", "--target", "ort", "--eval", str(folder / "eval.npz"), "--max-accuracy-drop",
                   "3%", "--seconds", "0.1", "--time-budget", "120", "--repo", str(repo.root)])
    return repo, folder, status


def test_the_edge_version_of_an_image_pipeline_is_judged_on_png_bytes(image_edge):
    repo, _, status = image_edge
    assert status == 0
    edge = repo.get("digits", 2)
    assert edge.manifest.format == "pipeline" and edge.signature == repo.get("digits", 1).signature
    assert json.loads(edge.model_path.read_text())["model_format"] == "ort"
    report = json.loads((edge.path / REPORT_JSON).read_text())
    assert report["int8"] and report["accuracy_checked"] and report["accuracy"]["metric"] == "top1"
    assert report["accuracy"]["original"] > 0.8  # the PNGs went through the image stage: raw bytes would score ~0.1
    assert report["accuracy"]["drop"] <= report["accuracy"]["allowed_drop"]
    assert any("runs the image pre-processing beside the model" in note for note in report["notes"])
    assert {"selection_top1", "holdout_top1"} <= set(edge.manifest.metrics)


def test_the_edge_version_answers_png_bytes_with_digit_names(image_edge, digits, live_server_factory):
    repo, _, _ = image_edge
    _, x_test, _, y_test = digits
    pngs = _pngs(x_test[200:260])
    session = load_session(repo.get("digits", 2))
    try:
        labels = session.run({"image": np.array(pngs, dtype=object)})["label"]
    finally:
        session.close()
    assert np.mean(labels == np.array(NAMES, dtype=object)[y_test[200:260]]) > 0.8
    repo.promote("digits", 2)
    try:
        server = live_server_factory(repo.root)
        blob = b"".join(len(p).to_bytes(4, "little") + p for p in pngs[:2])  # the binary tensor extension
        header = ('{"inputs":[{"name":"image","datatype":"BYTES","shape":[2],'
                  f'"parameters":{{"binary_data_size":{len(blob)}}}}}],"outputs":[{{"name":"label"}}]}}').encode()
        response = httpx.post(server.url + "/v2/models/digits/infer", content=header + blob, timeout=30,
                              headers={"Inference-Header-Content-Length": str(len(header))})
    finally:
        repo.promote("digits", 1)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [str(label) for label in labels[:2]]


def test_object_arrays_of_images_are_refused_with_how_to_save_them(image_edge, capsys):
    repo, folder, _ = image_edge
    status = main(["edge", "digits:1", "--target", "ort", "--eval", str(folder / "objects.npz"), "--repo", str(repo.root)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "np.array(list_of_png_bytes, dtype=bytes)" in err
    assert repo.versions("digits") == [1, 2]
