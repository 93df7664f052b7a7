"""The small training loop the PyTorch passes share: shuffled mini-batches, Adam, a progress bar, top-1 accuracy.

Pruning fine-tunes with cross-entropy and distillation with its own loss; both go through ``fit``, which
only knows how to walk over row indices and step an optimizer, so the loss stays with the pass that owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from leanserve.errors import InvalidInput

# Rows of inputs or labels, as the callers have them: NumPy arrays (the demo data) or tensors.
Rows = np.ndarray | torch.Tensor

# Takes a 1-D tensor of row indices (one mini-batch) and returns the scalar loss to minimise on it.
BatchLoss = Callable[[torch.Tensor], torch.Tensor]


def as_tensor(array: Rows, name: str) -> torch.Tensor:
    """``array`` (a NumPy array or a tensor) as a CPU tensor; raises InvalidInput naming ``name`` if it is empty."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    if tensor.ndim == 0 or len(tensor) == 0:
        raise InvalidInput(f"{name} must hold at least one row, got shape {tuple(tensor.shape)}")
    return tensor


def check_training_args(epochs: int, lr: float, batch_size: int) -> None:
    """Raise InvalidInput naming the first of ``epochs`` (>= 1), ``lr`` (> 0), ``batch_size`` (>= 1) that is out of range."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise InvalidInput(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")


def fit(parameters: Iterable[nn.Parameter], batch_loss: BatchLoss, rows: int, *, epochs: int, lr: float = 1e-3,
        batch_size: int = 64, seed: int = 0, progress: bool = True, desc: str = "training") -> list[float]:
    """Minimise ``batch_loss`` with Adam over ``epochs`` passes of shuffled mini-batches of ``rows`` row indices.

    The caller puts its modules in train/eval mode; ``fit`` only steps ``parameters``. Returns the mean
    loss of each epoch. Raises InvalidInput for ``epochs`` < 1, ``lr`` <= 0 or ``batch_size`` < 1.
    """
    from tqdm import tqdm

    check_training_args(epochs, lr, batch_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(list(parameters), lr=lr)
    losses = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        order, total = torch.randperm(rows, generator=generator), 0.0
        for start in range(0, rows, batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = batch_loss(idx)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / rows)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def finetune(module: nn.Module, x_train: Rows, y_train: Rows, *, epochs: int = 2, lr: float = 1e-3, batch_size: int = 64,
             seed: int = 0, progress: bool = True, desc: str = "fine-tuning") -> list[float]:
    """Fine-tune the classifier ``module`` in place with cross-entropy on (``x_train``, ``y_train``).

    Leaves the module in eval mode and returns the mean loss of each epoch. Raises InvalidInput if the
    inputs and labels differ in length or a training argument is out of range.
    """
    x, y = as_tensor(x_train, "x_train"), as_tensor(y_train, "y_train")
    if len(x) != len(y):
        raise InvalidInput(f"x_train has {len(x)} rows but y_train has {len(y)}")
    module.train()
    try:
        return fit(module.parameters(), lambda idx: nn.functional.cross_entropy(module(x[idx]), y[idx]), len(x),
                   epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress, desc=desc)
    finally:
        module.eval()


@torch.no_grad()
def top1_accuracy(module: nn.Module, x: Rows, y: Rows, batch_size: int = 256) -> float:
    """The fraction of rows of ``x`` whose highest-scoring class from ``module`` equals the label in ``y``.

    Runs in eval mode without gradients; raises InvalidInput if ``x`` and ``y`` differ in length.
    """
    x, y = as_tensor(x, "x"), as_tensor(y, "y")
    if len(x) != len(y):
        raise InvalidInput(f"x has {len(x)} rows but y has {len(y)}")
    was_training = module.training
    module.eval()
    correct = sum(int((module(x[s:s + batch_size]).argmax(dim=1) == y[s:s + batch_size]).sum())
                  for s in range(0, len(x), batch_size))
    module.train(was_training)
    return correct / len(x)


def count_params(module: nn.Module) -> int:
    """The number of distinct parameter values in ``module`` (a tensor shared by two layers counts once)."""
    return sum(p.numel() for p in module.parameters())
