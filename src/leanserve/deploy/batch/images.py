"""Batch input from a folder of images, one row per file, the file's name as its id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.deploy.batch.chunk import Chunk, first_line
from leanserve.errors import InvalidInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The folder's image files, by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_chunks(folder: Path, signature: Signature, chunk_rows: int) -> Iterator[Chunk]:
    """Images as float32 in [0, 1], resized to the input's [C, H, W] (or [H, W]); C 1 = grayscale, 3 = RGB.
    An unreadable file is set aside with the reason. Raises InvalidInput when the model takes no single
    fixed-size image input, or the folder has no images."""
    from PIL import Image, UnidentifiedImageError

    if len(signature.inputs) != 1 or len(signature.inputs[0].shape) not in (3, 4):
        raise InvalidInput("a folder of images needs a model with one image input of shape [N, C, H, W] or [N, H, W]")
    spec = signature.inputs[0]
    *channels, height, width = spec.shape[1:]
    if -1 in (height, width) or (channels and channels[0] not in (1, 3)):
        raise InvalidInput(f"input {spec.name!r} {list(spec.shape)}: images need a fixed size and 1 or 3 channels")
    mode = "RGB" if channels and channels[0] == 3 else "L"
    files = image_files(folder)
    if not files:
        raise InvalidInput(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    for index, start in enumerate(range(0, len(files), chunk_rows)):
        ids, rows, rejects = [], [], []
        for file in files[start:start + chunk_rows]:
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert(mode).resize((width, height)), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as exc:
                rejects.append({"id": file.name, "reason": f"unreadable image: {first_line(exc)}"})
                continue
            rows.append(pixels.transpose(2, 0, 1) if mode == "RGB" else (pixels[None] if channels else pixels))
            ids.append(file.name)
        inputs = {spec.name: np.stack(rows).astype(spec.dtype)} if rows else {}
        yield Chunk(index, ids, inputs, rejects)
