"""Image pipelines for tests: the digits CNN behind an image stage (PNG bytes in, digit names out)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from leanserve.pipeline import PipelineSpec
from leanserve.pipeline.image import ImageSpec

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def png(pixels: np.ndarray) -> bytes:
    """``pixels`` (H x W uint8) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def digits_image_pipeline(folder: Path, cnn_onnx: Path) -> Path:
    """``folder/pipeline.json``: the digits CNN with an image stage (28x28 grayscale, /255) and digit names
    (top 3), ready for ``Repository.add``."""
    folder.mkdir(parents=True)
    shutil.copyfile(cnn_onnx, folder / "model.onnx")
    image = ImageSpec(28, 28, 1, True, "float32", resize_height=28, resize_width=28)
    spec = PipelineSpec("image-classification", "model.onnx", "onnx", image.to_dict(),
                        {"kind": "classify", "labels": NAMES, "top_k": 3})
    (folder / "pipeline.json").write_text(spec.to_json())
    return folder / "pipeline.json"
