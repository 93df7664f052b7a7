"""The bundled demo: a small CNN trained on scikit-learn's digits (real data, seconds on 2 cores).

The 8x8 digit images are upsampled to 28x28 so the model has the shape of a typical small vision
model. ``make run`` trains it, exports it to ONNX, imports it into the repository and serves it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.artifact import Provenance
from leanserve.errors import InvalidInput
from leanserve.repository import Repository, VersionRef
from leanserve.serve.protocol.codec import encode_json_request

IMAGE_SIZE = 28


def digits_dataset(size: int = IMAGE_SIZE, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as float32 images ``[N,1,size,size]`` in [0,1]: (x_train, x_test, y_train, y_test)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x = images.numpy()
    return train_test_split(x, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=digits.target)


def build_cnn(width: int = 16):
    """A small CNN for 1x28x28 images and 10 classes."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_cnn(x_train: np.ndarray, y_train: np.ndarray, epochs: int = 15, seed: int = 0, progress: bool = True):
    """Train ``build_cnn()`` with Adam; shows a progress bar per epoch. Returns the module in eval mode."""
    import torch
    from torch import nn
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = build_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    bar = tqdm(range(epochs), desc="training CNN on digits", unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` against integer ``labels``."""
    return float((logits.argmax(axis=1) == labels).mean())


@dataclass(frozen=True)
class DemoResult:
    """What the demo built: the registered version and its held-out accuracy."""

    ref: VersionRef
    accuracy: float
    exporter: str
    max_abs_diff: float
    request_file: Path
    request_label: int
    example_files: tuple[Path, ...] = ()


def run_demo(repo: Repository, name: str = "digits-cnn", epochs: int = 15, progress: bool = True) -> DemoResult:
    """Train, export, import and evaluate the demo CNN; returns the new version and its accuracy."""
    import torch

    from leanserve.from_torch import export
    from leanserve.model import load
    from leanserve.torch_source import save_program, save_source

    if epochs < 1:
        raise InvalidInput(f"epochs must be at least 1, got {epochs}: an untrained model is no demo")
    x_train, x_test, y_train, y_test = digits_dataset()
    module = train_cnn(x_train, y_train, epochs=epochs, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "digits_cnn.onnx"
        result = export(module, torch.from_numpy(x_test[:4]), onnx_path, input_names=["image"], output_names=["logits"])
        source = save_source(module, torch.from_numpy(x_test[:4]), tmp)  # for learning and explanations
        program = save_program(module, torch.from_numpy(x_test[:4]), tmp)  # for device compilers (ExecuTorch)
        ref = repo.add(
            onnx_path, name,
            provenance=Provenance(source="leanserve demo: CNN trained on sklearn digits", exporter=result.exporter),
            attachments=[source] + ([program] if program else []),
        )
    from leanserve.monitor.reference import build_reference

    build_reference(repo, ref.name, ref.version, {"image": x_train})  # what drift is measured against
    model = load(ref.name, ref.version, repo=repo)
    acc = accuracy(model.predict({"image": x_test})["logits"], y_test)
    request_file = repo.root.resolve().parent / "digits-request.json"
    request_file.write_bytes(encode_json_request({"image": x_test[:1]}))
    examples = write_examples(repo.root.resolve().parent, x_train, x_test, y_test, repo.get(ref.name, ref.version).model_path)
    return DemoResult(ref, acc, result.exporter, result.max_abs_diff, request_file, int(y_test[0]), examples)


def write_examples(folder: Path, x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, model_file: Path) -> tuple[Path, ...]:
    """The files the README's first session uses, beside the repository: ``request.npz`` (4 held-out
    images), ``eval.npz`` (held-out images with ``labels``), ``calib.npz`` (128 training images),
    ``images/`` (32 held-out digits as PNG, for a batch job) and ``my_model.onnx`` (the demo's ONNX file,
    to try ``leanserve import`` on). Existing files are left alone."""
    import shutil

    from PIL import Image

    written = []
    arrays = {"request.npz": {"image": x_test[:4]}, "eval.npz": {"image": x_test, "labels": y_test},
              "calib.npz": {"image": x_train[:128]}}
    for name, data in arrays.items():
        if not (folder / name).exists():
            np.savez(folder / name, **data)
            written.append(folder / name)
    images = folder / "images"
    if not images.exists():
        images.mkdir()
        for i, image in enumerate(x_test[:32]):
            Image.fromarray((image[0] * 255).clip(0, 255).astype(np.uint8), mode="L").save(images / f"digit-{i:02d}.png")
        written.append(images)
    if not (folder / "my_model.onnx").exists():
        shutil.copyfile(model_file, folder / "my_model.onnx")
        written.append(folder / "my_model.onnx")
    return tuple(written)
