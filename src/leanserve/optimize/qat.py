"""Quantization-aware training for PyTorch models: fine-tune with fake int8 quantization, then export.

Conv and Linear layers are wrapped so that, during fine-tuning, their weights pass through per-channel
symmetric int8 fake quantization and their inputs through per-tensor affine uint8 fake quantization
with ranges tracked by an exponential moving average (PyTorch's straight-through estimators carry the
gradients). Two exports follow: the QDQ graph itself (the learned activation ranges baked in), or the
fine-tuned float weights for ONNX Runtime's static quantizer to calibrate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanserve.errors import InvalidInput
from leanserve.from_torch import ExportResult, export


class FakeQuantLayer(nn.Module):
    """A Conv/Linear whose weight and input are fake-quantized to int8 / uint8."""

    def __init__(self, layer: nn.Module, momentum: float = 0.05) -> None:
        super().__init__()
        self.layer = layer
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))
        self.frozen_scale: torch.Tensor | None = None  # per-channel weight scale, fixed for export

    def _input_qparams(self) -> tuple[float, int]:
        low, high = min(float(self.low), 0.0), max(float(self.high), 0.0)
        scale = max((high - low) / 255.0, 1e-8)
        return scale, int(round(-low / scale))

    def weight_scale(self) -> torch.Tensor:
        weight = self.layer.weight.detach()
        return weight.abs().reshape(weight.shape[0], -1).amax(dim=1).clamp(min=1e-8) / 127.0

    def freeze(self) -> None:
        """Fix the weight scales so an export sees constants (and ONNX Runtime folds the int8 weights)."""
        self.frozen_scale = self.weight_scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                low, high = x.min(), x.max()
                if not bool(self.seen):
                    self.low.copy_(low), self.high.copy_(high), self.seen.fill_(True)
                else:
                    self.low.lerp_(low, self.momentum), self.high.lerp_(high, self.momentum)
        scale, zero = self._input_qparams()
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
        weight = self.layer.weight
        per_channel = self.frozen_scale if self.frozen_scale is not None else self.weight_scale()
        weight = torch.fake_quantize_per_channel_affine(
            weight, per_channel, torch.zeros(weight.shape[0], dtype=torch.int32), 0, -128, 127)
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def prepare_qat(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Conv2d/Conv1d/Linear wrapped in a FakeQuantLayer."""
    model = copy.deepcopy(module)
    if isinstance(model, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return FakeQuantLayer(model)
    wrapped = 0
    for name, child in list(model.named_modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                setattr(child, attr, FakeQuantLayer(layer))
                wrapped += 1
    if not wrapped:
        raise InvalidInput("quantization-aware training found no Conv or Linear layer to quantize")
    return model


def strip_qat(module: nn.Module) -> nn.Module:
    """A copy with the fake quantization removed: the fine-tuned float layers only."""
    model = copy.deepcopy(module)
    for child in list(model.modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, FakeQuantLayer):
                setattr(child, attr, layer.layer)
    return model


@dataclass(frozen=True)
class QatResult:
    """The fine-tuned model (with fake quantization) and its training losses per epoch."""

    module: nn.Module
    losses: list[float]


def qat_finetune(module: nn.Module, x_train: np.ndarray, y_train: np.ndarray, *, epochs: int = 2, lr: float = 1e-4,
                 batch_size: int = 64, seed: int = 0, progress: bool = True) -> QatResult:
    """Fine-tune a classifier with fake int8 quantization (cross-entropy on ``y_train``)."""
    from leanserve.optimize.train import finetune

    model = prepare_qat(module)
    losses = finetune(model, x_train, y_train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      progress=progress, desc="quantization-aware training")
    return QatResult(model.eval(), losses)


def export_qat(module: nn.Module, example_inputs, path: str | Path, *, qdq: bool = True, **kwargs) -> ExportResult:
    """Export a QAT model: ``qdq=True`` writes its QuantizeLinear/DequantizeLinear graph (ranges learned in
    training); ``qdq=False`` writes the fine-tuned float model, to quantize with ``static_int8``."""
    model = copy.deepcopy(module) if qdq else strip_qat(module)
    for layer in model.modules():
        if isinstance(layer, FakeQuantLayer):
            layer.freeze()
    return export(model.eval(), example_inputs, path, tolerance=kwargs.pop("tolerance", 1e-3), **kwargs)
