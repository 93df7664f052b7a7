"""Weight sharing: layers whose weights are (nearly) the same are tied to one Parameter.

Two layers of the same type and weight shape whose flattened weights point the same way (cosine
similarity at or above a threshold) are tied: the later layer reuses the earlier layer's weight and bias.
Tying is exact when the weights are identical; otherwise it changes the later layer's output, so each
pair also reports its relative difference (cosine similarity ignores scale; the difference does not).
The PyTorch model then holds fewer distinct parameters; whether the ONNX file shrinks depends on the
exporter storing the shared tensor once, so the report measures the exported size instead of assuming.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from leanserve.errors import InvalidInput
from leanserve.optimize.train import count_params


@dataclass(frozen=True)
class SharedPair:
    """Two layers to tie: ``tied`` (the later) reuses ``kept``'s (the earlier) weight and bias."""

    kept: str
    tied: str
    similarity: float  # cosine similarity of the flattened weights
    relative_difference: float  # ||p_tied - p_kept|| / ||p_tied|| over weight and bias: 0 means tying is exact


@dataclass(frozen=True)
class ShareReport:
    """A copy of the model with similar layers tied, and what that saved.

    ``params_*`` count distinct parameter values (a shared tensor counts once); ``onnx_bytes_*`` are the
    sizes of ONNX exports before and after, when example inputs were given to export with.
    """

    module: nn.Module
    pairs: tuple[SharedPair, ...]
    params_before: int
    params_after: int
    onnx_bytes_before: int | None = None
    onnx_bytes_after: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def params_saved(self) -> int:
        """How many parameter values tying removed."""
        return self.params_before - self.params_after


def find_similar_layers(module: nn.Module, threshold: float = 0.99) -> list[SharedPair]:
    """Pairs of layers of ``module`` with the same type, weight shape and bias shape whose flattened weights
    have cosine similarity >= ``threshold`` (0 < threshold <= 1).

    Each later layer is paired with the earliest matching layer (in ``named_modules`` order) that is not
    itself paired to an earlier one, so chains collapse onto one kept layer. Layers already sharing a
    weight are skipped. Returns the pairs in module order; raises InvalidInput for a bad ``threshold``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InvalidInput(f"threshold must be in (0, 1], got {threshold!r}")
    groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, layer in module.named_modules():
        own = dict(layer.named_parameters(recurse=False))
        weight, bias = own.get("weight"), own.get("bias")
        if weight is not None:
            key = (type(layer), tuple(weight.shape), None if bias is None else tuple(bias.shape))
            groups.setdefault(key, []).append((name, layer))
    pairs, tied = [], set()
    for layers in groups.values():
        for j, (name, layer) in enumerate(layers):
            match = _first_match(layers[:j], layer, tied, threshold)
            if match is not None:
                tied.add(name)
                pairs.append(SharedPair(match[0], name, match[1], _relative_difference(layer, match[2])))
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return sorted(pairs, key=lambda pair: order[pair.tied])


def share_similar_layers(module: nn.Module, threshold: float = 0.99, *,
                         example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None) -> ShareReport:
    """Tie every pair ``find_similar_layers`` finds in a copy of ``module`` to one shared weight (and bias).

    With ``example_inputs`` (a tensor or tuple of tensors) both the original and the tied copy are exported
    with ``leanserve.from_torch.export`` and their ONNX sizes reported. Returns a ShareReport; raises
    InvalidInput for a bad ``threshold`` and ExportError if an export fails.
    """
    model = copy.deepcopy(module)
    pairs = find_similar_layers(model, threshold)
    for pair in pairs:
        kept, tied = model.get_submodule(pair.kept), model.get_submodule(pair.tied)
        tied.weight = kept.weight
        if kept.bias is not None:
            tied.bias = kept.bias
    before, after = count_params(module), count_params(model)
    onnx_before = onnx_after = None
    if example_inputs is not None:
        onnx_before, onnx_after = _onnx_bytes(module, example_inputs), _onnx_bytes(model, example_inputs)
    return ShareReport(model, tuple(pairs), before, after, onnx_before, onnx_after,
                       _notes(pairs, before, after, _param_bytes(module) - _param_bytes(model), onnx_before, onnx_after))


def _first_match(earlier, layer: nn.Module, tied: set[str], threshold: float):
    """(name, similarity, module) of the first of ``earlier`` whose weight is similar enough, else None."""
    flat = layer.weight.detach().flatten()
    for name, candidate in earlier:
        if name in tied or candidate.weight is layer.weight:
            continue
        similarity = float(F.cosine_similarity(candidate.weight.detach().flatten(), flat, dim=0))
        if similarity >= threshold:
            return name, similarity, candidate
    return None


def _relative_difference(layer: nn.Module, kept: nn.Module) -> float:
    own = [p.detach().flatten() for p in (layer.weight, layer.bias) if p is not None]
    other = [p.detach().flatten() for p in (kept.weight, kept.bias) if p is not None]
    mine, theirs = torch.cat(own), torch.cat(other)
    return float((mine - theirs).norm() / mine.norm().clamp(min=1e-12))


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _onnx_bytes(module: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """The size of ``module``'s ONNX export, external data files included."""
    from leanserve.from_torch import export

    with tempfile.TemporaryDirectory() as tmp:
        export(copy.deepcopy(module), example_inputs, Path(tmp) / "model.onnx")
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.is_file())


def _notes(pairs, before: int, after: int, saved_bytes: int, onnx_before: int | None,
           onnx_after: int | None) -> tuple[str, ...]:
    if not pairs:
        return ("no layers were similar enough to share",)
    worst = max(pair.relative_difference for pair in pairs)
    notes = [
        f"tied {len(pairs)} layer(s): {before:,} -> {after:,} distinct parameters ({before - after:,} saved)",
        f"largest relative change of a tied layer's parameters: {worst:.3g}"
        + (" (exact: outputs unchanged)" if worst == 0 else "; re-check accuracy, tied layers now compute differently"),
    ]
    if onnx_before is not None and onnx_after is not None:
        # the exporter may write a shared parameter once per use; judge by how much of it the file lost
        stored = "once" if onnx_before - onnx_after >= 0.9 * saved_bytes else "more than once (the exporter did not deduplicate it)"
        notes.append(f"ONNX export: {onnx_before:,} -> {onnx_after:,} bytes, against {saved_bytes:,} bytes of tied "
                     f"parameters; the shared tensors are stored {stored}")
    else:
        notes.append("the ONNX size was not measured (pass example_inputs); it shrinks only if the exporter stores shared weights once")
    return tuple(notes)
