"""Pruning PyTorch models: zeroing weights (unstructured) or removing whole channels (structured).

Unstructured pruning uses ``torch.nn.utils.prune``; it makes tensors sparse but not smaller, so it only
pays off with a sparse kernel or a compressed file. Structured pruning uses Torch-Pruning's dependency
graph, which knows which layers must lose the same channels together (a conv's filters, the following
conv's inputs, the Linear after a Flatten), so the pruned model is a smaller dense model any runtime
runs faster. Every function works on a deep copy and leaves its argument untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import prune

from leanserve.errors import InvalidInput
from leanserve.optimize.train import Rows, check_training_args, count_params, finetune

PRUNABLE = (_ConvNd, nn.Linear)

# What a forward pass takes: one tensor or a tuple of them.
ExampleInputs = torch.Tensor | tuple[torch.Tensor, ...]
# Layers to leave whole: submodules of the model being pruned, or their names in ``named_modules()``.
IgnoredLayers = Sequence[nn.Module | str] | None


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """A pruned copy of a model and what pruning did to its size and compute.

    ``params_*`` count parameter values (zeros included); ``sparsity`` is the fraction of zeros across
    the Conv/Linear weights; ``gzip_bytes_*`` is the size of the gzip-compressed state dict, the only
    size unstructured pruning changes; ``macs_*`` are multiply-accumulates per forward pass of the
    example inputs (structured pruning only).
    """

    module: nn.Module
    method: str  # "unstructured" or "structured"
    params_before: int
    params_after: int
    nonzero_params_after: int
    sparsity: float
    gzip_bytes_before: int
    gzip_bytes_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    losses: tuple[float, ...] = ()  # fine-tuning loss per epoch, when the pass fine-tuned
    notes: tuple[str, ...] = ()


def prune_unstructured(module: nn.Module, amount: float) -> PruneReport:
    """Zero the ``amount`` fraction (0 < amount < 1) of smallest-magnitude Conv/Linear weights, ranked globally.

    Uses ``torch.nn.utils.prune.global_unstructured`` with L1 magnitude, then ``prune.remove`` so the
    zeros are baked into plain weights (no masks or hooks remain). Returns a PruneReport on a pruned
    copy. Raises InvalidInput if ``amount`` is out of range or the module has no Conv/Linear layer.
    """
    _check_fraction(amount, "amount")
    model = copy.deepcopy(module)
    targets = _weight_targets(model)
    if not targets:
        raise InvalidInput("module has no Conv or Linear layer whose weights could be pruned")
    before_bytes = gzip_state_dict_bytes(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(amount))
    for layer, name in targets:
        prune.remove(layer, name)
    sparsity = weight_sparsity(model)
    after_bytes = gzip_state_dict_bytes(model)
    note = (
        f"{sparsity:.1%} of Conv/Linear weights are now zero, but every tensor keeps its shape: dense runtimes "
        "(PyTorch, ONNX Runtime) do the same multiply-adds, so this is not faster, and the saved file is "
        f"the same size unless compressed (gzip of the state dict: {before_bytes:,} -> {after_bytes:,} bytes)"
    )
    params = count_params(model)
    return PruneReport(model, "unstructured", count_params(module), params, _nonzero(model), sparsity,
                       before_bytes, after_bytes, notes=(note,))


def prune_structured(module: nn.Module, example_inputs: ExampleInputs, ratio: float,
                     ignored_layers: IgnoredLayers = None, round_to: int | None = None) -> PruneReport:
    """Physically remove the ``ratio`` fraction (0 < ratio < 1) of channels of every prunable layer.

    Channels are ranked by group L2 magnitude (Torch-Pruning's ``MagnitudeImportance``) and removed by its
    ``BasePruner`` along the dependency graph traced from ``example_inputs`` (a tensor or tuple of
    tensors). ``ignored_layers`` (modules of ``module`` or their names) keep their output channels; the
    classifier (the last Conv/Linear to run) is always kept, so the output shape does not change.
    ``round_to`` keeps channel counts multiples of it. Returns a PruneReport on a pruned copy; raises
    InvalidInput for an out-of-range ``ratio``/``round_to``, bad ``example_inputs`` or unknown ignored layers.
    """
    _check_fraction(ratio, "ratio")
    model, args, pruner = _structured_pruner(module, example_inputs, ratio, 1, ignored_layers, round_to)
    before = _measure(model, args)
    pruner.step()
    return _structured_report(module, model, args, before)


def iterative_prune_and_finetune(
    module: nn.Module, example_inputs: ExampleInputs, x_train: Rows, y_train: Rows, target_ratio: float,
    steps: int = 3, epochs_per_step: int = 2, *, lr: float = 1e-3, batch_size: int = 64,
    ignored_layers: IgnoredLayers = None, round_to: int | None = None, seed: int = 0, progress: bool = True,
) -> PruneReport:
    """Reach ``target_ratio`` of removed channels in ``steps`` equal structured-pruning steps, each followed by
    ``epochs_per_step`` epochs of cross-entropy fine-tuning on (``x_train``, ``y_train``).

    Small steps with recovery in between lose less accuracy than one large cut. Channels are ranked as in
    ``prune_structured`` (same ``ignored_layers``/``round_to``); Torch-Pruning's linear scheduler sets the
    ratio of each step. Returns a PruneReport whose ``losses`` hold every fine-tuning epoch. Raises
    InvalidInput for an out-of-range ``target_ratio``, ``steps`` or ``epochs_per_step``, or bad inputs.
    """
    _check_fraction(target_ratio, "target_ratio")
    if steps < 1:
        raise InvalidInput(f"steps must be >= 1, got {steps}")
    if epochs_per_step < 1:
        raise InvalidInput(f"epochs_per_step must be >= 1, got {epochs_per_step}")
    check_training_args(epochs_per_step, lr, batch_size)
    model, args, pruner = _structured_pruner(module, example_inputs, target_ratio, steps, ignored_layers, round_to)
    before = _measure(model, args)
    losses, notes = [], []
    for step in range(1, steps + 1):
        pruner.step()
        step_losses = finetune(model, x_train, y_train, epochs=epochs_per_step, lr=lr, batch_size=batch_size,
                               seed=seed + step, progress=progress, desc=f"fine-tuning after pruning step {step}/{steps}")
        losses += step_losses
        notes.append(f"step {step}/{steps}: {count_params(model):,} parameters, fine-tuned to loss {step_losses[-1]:.3f}")
    report = _structured_report(module, model, args, before)
    return dataclasses.replace(report, losses=tuple(losses), notes=report.notes + tuple(notes))


def _structured_pruner(module, example_inputs, ratio, steps, ignored_layers, round_to):
    """A deep copy of ``module``, its example arguments and a Torch-Pruning pruner over the copy."""
    tp = _torch_pruning()
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise InvalidInput(f"round_to must be a positive integer or None, got {round_to!r}")
    args = example_args(example_inputs)
    model = copy.deepcopy(module).eval()
    ignored = _resolve_ignored(module, model, ignored_layers)
    classifier = _last_layer_run(model, args)
    if classifier is None:
        raise InvalidInput("module runs no Conv or Linear layer on example_inputs, so there is nothing to prune")
    pruner = tp.pruner.BasePruner(
        model, args, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=float(ratio),
        iterative_steps=steps, ignored_layers=[*ignored, classifier], round_to=round_to,
    )
    return model, args, pruner


def _structured_report(original: nn.Module, model: nn.Module, args, before: tuple[int, int, int]) -> PruneReport:
    macs_before, params_before, bytes_before = before
    macs_after, params_after, bytes_after = _measure(model, args)
    note = (
        f"removed channels: {params_before:,} -> {params_after:,} parameters, {macs_before:,} -> {macs_after:,} "
        "MACs per forward pass; the model is smaller and still dense, so every runtime does less work (measure the "
        "latency: on tiny models per-call overhead can dominate); fine-tune to recover accuracy"
    )
    return PruneReport(model, "structured", count_params(original), params_after, _nonzero(model),
                       weight_sparsity(model), bytes_before, bytes_after, macs_before, macs_after, notes=(note,))


def _measure(model: nn.Module, args) -> tuple[int, int, int]:
    """(MACs, parameters, gzip bytes of the state dict) of ``model`` on ``args``."""
    macs, _ = _torch_pruning().utils.count_ops_and_params(model, args)
    return int(macs), count_params(model), gzip_state_dict_bytes(model)


def example_args(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor or a tuple/list of tensors) as a tuple; raises InvalidInput otherwise."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InvalidInput("example_inputs must be a torch.Tensor or a tuple of them")
    return args


def _resolve_ignored(original: nn.Module, model: nn.Module, ignored_layers: IgnoredLayers) -> list[nn.Module]:
    """The layers of the copy ``model`` that ``ignored_layers`` (modules of ``original`` or names) point at."""
    names_by_id = {id(m): name for name, m in original.named_modules()}
    copies = dict(model.named_modules())
    resolved = []
    for layer in ignored_layers or ():
        name = layer if isinstance(layer, str) else names_by_id.get(id(layer))
        if name is None or name not in copies:
            raise InvalidInput(f"ignored_layers names {layer!r}, which is not a submodule of the module")
        resolved.append(copies[name])
    return resolved


def _last_layer_run(model: nn.Module, args) -> nn.Module | None:
    """The last Conv/Linear layer a forward pass of ``args`` runs: the layer producing the output."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


def _weight_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    seen, targets = set(), []
    for layer in model.modules():
        # a weight tied between layers is pruned once
        if isinstance(layer, PRUNABLE) and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            targets.append((layer, "weight"))
    return targets


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of exactly-zero values across the (distinct) Conv/Linear weights of ``model``."""
    weights = [layer.weight for layer, _ in _weight_targets(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def _nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def gzip_state_dict_bytes(model: nn.Module) -> int:
    """The size in bytes of ``model``'s state dict saved with ``torch.save`` and compressed with gzip."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(gzip.compress(buffer.getvalue(), compresslevel=6))


def _torch_pruning():
    """The ``torch_pruning`` module (imported on first use: it is only needed for structured pruning)."""
    try:
        import torch_pruning
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "structured pruning needs Torch-Pruning: pip install 'torch-pruning>=1.6.1' (or leanserve[optimize])"
        ) from exc
    return torch_pruning


def _check_fraction(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidInput(f"{name} must be a fraction strictly between 0 and 1, got {value!r}")
