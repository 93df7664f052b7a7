"""Images in, labels out: the digits CNN fed PNG bytes; bad images refused with a 400 naming the problem."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from leanserve.artifact import TensorSpec  # noqa: E402
from leanserve.pipeline.image import spec_from_preprocessor  # noqa: E402
from leanserve.runtime import load_session  # noqa: E402
from image_support import NAMES, digits_image_pipeline, png  # noqa: E402


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no pixel data: refused from the header,
    it costs nothing to build or to check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def digits_pipeline(tmp_path, repo, digits_cnn_onnx):
    """The digits CNN with an image stage (28x28 grayscale, /255) and digit names: cnn-images:1."""
    repo.add(digits_image_pipeline(tmp_path / "stage", digits_cnn_onnx), "cnn-images")
    repo.add(digits_cnn_onnx, "cnn")
    return repo


def test_png_bytes_give_the_tensor_model_s_answers_with_labels_by_name(digits_pipeline, digits):
    _, x_test, _, y_test = digits
    rows = 64
    pixels = np.round(x_test[:rows, 0] * 255).astype(np.uint8)  # what a PNG of these digits holds
    images = load_session(digits_pipeline.get("cnn-images"))
    tensors = load_session(digits_pipeline.get("cnn"))
    got = images.run({"image": np.array([png(p) for p in pixels], dtype=object)})
    logits = tensors.run({"image": (pixels[:, None] / np.float32(255)).astype(np.float32)})["logits"]
    assert got["label"].tolist() == [NAMES[i] for i in logits.argmax(1)]
    assert np.mean(got["label"] == np.array(NAMES, dtype=object)[y_test[:rows]]) > 0.8
    assert got["top_labels"].shape == (rows, 3) and got["top_scores"].shape == (rows, 3)
    assert np.all(np.diff(got["top_scores"], axis=1) <= 0) and np.allclose(got["probabilities"].sum(1), 1, atol=1e-5)


def test_bad_images_are_400s_naming_the_problem(digits_pipeline, live_server_factory, digits):
    server = live_server_factory(digits_pipeline.root)
    good = png(np.round(digits[1][0, 0] * 255).astype(np.uint8))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(jpeg, format="JPEG")
    cases = {
        "a truncated JPEG header": (jpeg.getvalue()[:40] + b"\0" * 20, "the image is corrupt or truncated"),
        "corrupt JPEG data": (jpeg.getvalue()[:-200], "the image is corrupt or truncated"),
        "not an image": (b"GIF89a-ish nonsense", "not a JPEG, PNG or WebP image"),
        "50 megapixels": (_header_only_png(10_000, 5_000), "50.0 megapixels exceeds this model's limit of 25.0"),
        "empty": (b"", "must be non-empty bytes"),
    }
    for what, (blob, message) in cases.items():
        header = ('{"inputs":[{"name":"image","datatype":"BYTES","shape":[2],'
                  f'"parameters":{{"binary_data_size":{len(blob) + len(good) + 8}}}}}]}}').encode()
        body = header + len(good).to_bytes(4, "little") + good + len(blob).to_bytes(4, "little") + blob
        answer = httpx.post(server.url + "/v2/models/cnn-images/infer", content=body, timeout=30,
                            headers={"Inference-Header-Content-Length": str(len(header))})
        assert answer.status_code == 400, (what, answer.text)
        assert "row 1" in answer.json()["error"] and message in answer.json()["error"], what
    answer = httpx.post(server.url + "/v2/models/cnn-images/infer", timeout=30, json={
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}]})
    assert answer.status_code == 400 and "expected datatype BYTES, got FP32" in answer.json()["error"]
    header = b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":%d}}]}' % (len(good) + 4)
    answer = httpx.post(server.url + "/v2/models/cnn-images/infer", content=header + len(good).to_bytes(4, "little") + good,
                        headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert answer.status_code == 200, answer.text


def _reference_transform(image: Image.Image, config: dict) -> np.ndarray:
    """torchvision's Resize(shortest edge) -> CenterCrop -> ToTensor -> Normalize, written out by hand:
    torchvision from PyPI does not import beside torch 2.13 here (see .library/env/machines/python.md)."""
    edge = config["size"]["shortest_edge"]
    scale = edge / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    crop = config["crop_size"]["height"]
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    array = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255
    return ((array - np.array(config["image_mean"], np.float32)) / np.array(config["image_std"], np.float32)).transpose(2, 0, 1)


def test_declared_normalization_matches_a_reference_transform():
    from leanserve.pipeline.image import ImageStage

    config = {"do_resize": True, "size": {"shortest_edge": 32}, "do_center_crop": True,
              "crop_size": {"height": 24, "width": 24}, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
              "resample": 2}
    stage = ImageStage(spec_from_preprocessor(config, TensorSpec("pixel_values", "FP32", (-1, 3, 24, 24))))
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="WEBP", lossless=True)
    got = stage("image", np.array([buffer.getvalue()], dtype=object))[0]
    assert got.shape == (3, 24, 24)
    assert np.abs(got - _reference_transform(picture, config)).max() < 1e-5
