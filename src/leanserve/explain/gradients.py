"""Captum's Integrated Gradients over a version's PyTorch source (``torch_source.pt``): gradients need
the model itself, not an engine, and a floating-point input to integrate along."""

from __future__ import annotations

import numpy as np

from leanserve.explain.methods import INTEGRATED_GRADIENTS, Attribution, Deadline, columns, score_targets


def integrated_gradients(module, x: np.ndarray, baseline: np.ndarray, deadline: Deadline, *, output_index: int = 0,
                         target: int | None = None, steps: int = 50) -> Attribution:
    """Integrated Gradients (Captum) of each row of ``x`` through a PyTorch ``module``, from ``baseline``
    (one row, broadcast to every row of ``x``) in ``steps`` Gauss-Legendre steps, for the ``column`` score.

    ``output_index`` picks the explained output when the module returns several. Raises
    ExplanationTimeout when ``deadline`` passes.
    """
    import torch
    from captum.attr import IntegratedGradients

    def forward(batch):
        deadline.check()
        out = module(batch)
        if isinstance(out, (tuple, list)):
            out = out[output_index]
        return out.reshape(len(out), -1)

    inputs = torch.tensor(x, dtype=torch.float32)  # a copy: request arrays may be read-only views of the body
    start = torch.tensor(np.broadcast_to(baseline, x.shape), dtype=torch.float32)
    deadline.check()
    with torch.no_grad():
        outputs = columns(forward(inputs).numpy())
        base_outputs = columns(forward(start).numpy())
    targets = score_targets(outputs, target)
    column = torch.from_numpy(np.maximum(targets, 0))
    values, delta = IntegratedGradients(forward).attribute(
        inputs, baselines=start, target=column, n_steps=steps, return_convergence_delta=True)
    rows = np.arange(len(x))
    picked, base_picked = outputs[rows, np.maximum(targets, 0)], base_outputs[rows, np.maximum(targets, 0)]
    return Attribution(INTEGRATED_GRADIENTS, values.detach().numpy().astype(np.float32), targets, picked,
                       base_picked, float(delta.abs().max()))
