"""Image input stage: V2 BYTES holding JPEG, PNG or WebP files -> the model's float tensor.

The spec follows Hugging Face's ``preprocessor_config.json`` (``do_resize``/``size``, ``do_center_crop``/
``crop_size``, ``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``); channel
order (``[N, C, H, W]`` or ``[N, H, W, C]``), channel count and dtype come from the model's signature.
Each image's size is read from its header and refused above ``max_pixels`` before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leanserve.artifact import TensorSpec
from leanserve.errors import InvalidInput, ModelLoadError

FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 25_000_000  # 25 MP: a 5000x5000 photo passes, a 50 MP one is refused from its header
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # HF's `resample` takes PIL's numbers too


@dataclass(frozen=True)
class ImageSpec:
    """How one model wants its images (all sizes in pixels)."""

    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    channels_first: bool
    dtype: str  # numpy dtype name of the model input
    resize_shortest_edge: int | None = None  # else resize straight to (resize_height, resize_width)
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = 2
    crop: bool = False
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "image", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageSpec:
        values = {k: v for k, v in data.items() if k != "kind"}
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(x) for x in values[key])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ModelLoadError(f"pipeline image stage: {exc}") from exc


def spec_from_preprocessor(config: Mapping[str, Any], input_spec: TensorSpec) -> ImageSpec:
    """An ImageSpec from a Hugging Face ``preprocessor_config.json`` and the model's image input."""
    shape = input_spec.shape
    if len(shape) != 4:
        raise InvalidInput(f"input {input_spec.name!r}: an image input needs rank 4 ([N,C,H,W] or [N,H,W,C]), "
                           f"got {list(shape)}")
    channels_first = shape[1] in (1, 3)
    channels = shape[1] if channels_first else shape[3]
    size = _size(config.get("size")) if config.get("do_resize", True) else None
    crop = _size(config.get("crop_size")) if config.get("do_center_crop") else None
    shortest = int(size["shortest_edge"]) if size and "shortest_edge" in size else None
    resize_to = (int(size["height"]), int(size["width"])) if size and "height" in size else None
    h_dim, w_dim = (shape[2], shape[3]) if channels_first else (shape[1], shape[2])
    if crop:
        height, width = int(crop["height"]), int(crop["width"])
    elif resize_to:
        height, width = resize_to
    elif shortest:
        height = width = shortest
    else:
        height, width = h_dim, w_dim
    if -1 not in (h_dim, w_dim) and (height, width) != (h_dim, w_dim):
        raise InvalidInput(f"input {input_spec.name!r}: the preprocessor makes {height}x{width} images, the model "
                           f"takes {h_dim}x{w_dim}")
    normalize = config.get("do_normalize") and "image_mean" in config and "image_std" in config
    return ImageSpec(
        height, width, int(channels), channels_first, input_spec.dtype.name,
        resize_shortest_edge=shortest, resize_height=resize_to[0] if resize_to else None,
        resize_width=resize_to[1] if resize_to else None, resample=int(config.get("resample", 2)), crop=bool(crop),
        rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
        mean=tuple(float(x) for x in config["image_mean"]) if normalize else None,
        std=tuple(float(x) for x in config["image_std"]) if normalize else None,
    )


def _size(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return {"height": value, "width": value}
    return dict(value)


class ImageStage:
    """Decodes, checks and converts a batch of image files (thread-safe: it holds only the spec)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def check(self, name: str, items: np.ndarray) -> int:
        """Refuse, from their headers alone, images that are not JPEG/PNG/WebP or exceed ``max_pixels``.
        Returns the number of images. Raises InvalidInput naming the row and the problem."""
        for row, blob in enumerate(items.reshape(-1)):
            self._open(name, row, blob)
        return items.size

    def __call__(self, name: str, items: np.ndarray) -> np.ndarray:
        """The model's input tensor for a [N] BYTES array of image files. Raises InvalidInput. An empty
        element (what warm-up and test runs send; requests' empty ones were refused by ``check``) is a
        blank image."""
        return np.stack([self._convert(name, row, blob) if len(blob) else np.zeros(shapes(self.spec), self.spec.dtype)
                         for row, blob in enumerate(items.reshape(-1))])

    def _open(self, name: str, row: int, blob: Any):
        from PIL import Image, UnidentifiedImageError

        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise InvalidInput(f"input {name!r} row {row}: an image file must be non-empty bytes")
        try:
            with warnings.catch_warnings():
                # Pillow's own bomb check warns (or raises) at open; ours below is the one that applies
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(blob), formats=FORMATS)  # reads the header only
        except UnidentifiedImageError:
            raise InvalidInput(f"input {name!r} row {row}: not a JPEG, PNG or WebP image") from None
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            raise InvalidInput(f"input {name!r} row {row}: the image is corrupt or truncated ({exc})") from None
        pixels = image.width * image.height
        if pixels > self.spec.max_pixels:
            raise InvalidInput(f"input {name!r} row {row}: image of {image.width}x{image.height} = {pixels / 1e6:.1f} "
                               f"megapixels exceeds this model's limit of {self.spec.max_pixels / 1e6:.1f} megapixels")
        return image

    def _convert(self, name: str, row: int, blob: bytes) -> np.ndarray:
        spec = self.spec
        image = self._open(name, row, blob)
        try:
            image = image.convert("L" if spec.channels == 1 else "RGB")  # decodes the pixels
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidInput(f"input {name!r} row {row}: the image is corrupt or truncated ({exc})") from None
        image = self._resize(image)
        if spec.crop:
            image = _center_crop(image, spec.height, spec.width)
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), spec.resample)
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if spec.rescale_factor is not None:
            pixels = pixels * np.float32(spec.rescale_factor)
        if spec.mean is not None and spec.std is not None:
            pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        if spec.channels_first:
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=spec.dtype)

    def _resize(self, image):
        spec = self.spec
        if spec.resize_shortest_edge:
            width, height = image.size
            scale = spec.resize_shortest_edge / min(width, height)
            # rounded as Hugging Face's image processors round the longer edge
            size = (int(round(width * scale)), int(round(height * scale)))
            return image.resize(size, spec.resample) if size != image.size else image
        if spec.resize_height and spec.resize_width and image.size != (spec.resize_width, spec.resize_height):
            return image.resize((spec.resize_width, spec.resize_height), spec.resample)
        return image


def _center_crop(image, height: int, width: int):
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def shapes(spec: ImageSpec) -> Sequence[int]:
    """The model input's shape for one image."""
    return (spec.channels, spec.height, spec.width) if spec.channels_first else (spec.height, spec.width, spec.channels)
