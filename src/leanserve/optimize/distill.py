"""Knowledge distillation: train a smaller student to imitate a trained teacher.

Response-based distillation matches the student's temperature-softened output distribution to the
teacher's (Hinton et al., 2015); feature-based distillation also matches chosen intermediate
activations (FitNets, Romero et al., 2015) through small learned projections, because a narrower
student's features have fewer channels than the teacher's. ``width_student`` builds the usual student:
the teacher with every prunable layer narrowed, by Torch-Pruning's structured pruning.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from leanserve.errors import InvalidInput
from leanserve.optimize.prune import ExampleInputs, IgnoredLayers, example_args, prune_structured
from leanserve.optimize.train import Rows, as_tensor, check_training_args, count_params, fit

FeaturePair = tuple[str, str]  # (teacher module name, student module name)


@dataclass(frozen=True)
class DistillReport:
    """The distilled student, its loss per epoch, and the sizes of teacher and student.

    ``projections`` holds the learned projection of each feature pair (student feature -> teacher
    feature); they exist only to train the student and are not part of it.
    """

    student: nn.Module
    losses: tuple[float, ...]
    teacher_params: int
    student_params: int
    feature_pairs: tuple[FeaturePair, ...] = ()
    projections: nn.ModuleList | None = None
    notes: tuple[str, ...] = ()


def distill(
    teacher: nn.Module, student: nn.Module, x_train: Rows, y_train: Rows | None = None, *, epochs: int,
    temperature: float = 4.0, alpha: float = 0.5, lr: float = 1e-3, feature_pairs: Sequence[FeaturePair] | None = None,
    feature_weight: float = 1.0, batch_size: int = 64, seed: int = 0, progress: bool = True,
) -> DistillReport:
    """Train a copy of ``student`` to imitate ``teacher`` on ``x_train`` for ``epochs`` epochs of Adam at ``lr``.

    The loss is ``temperature``² × KL(teacher ‖ student) of the outputs softened by ``temperature``; with
    labels ``y_train`` it becomes ``alpha`` × that + (1 − ``alpha``) × cross-entropy, without labels only
    the soft targets are used. Each ``feature_pairs`` entry (teacher module name, student module name)
    adds ``feature_weight`` × ``feature_loss`` (relative MSE) between the teacher's activation and the
    student's projected by a 1x1 conv (4-D features) or a Linear on the last axis (other ranks); the
    projections are trained jointly with the student.
    The teacher is only evaluated. Returns a DistillReport; raises InvalidInput naming a bad argument
    (unknown module names in ``feature_pairs``, features whose shapes cannot be matched, ...).
    """
    check_training_args(epochs, lr, batch_size)
    _check_distill_args(temperature, alpha, feature_weight)
    x = as_tensor(x_train, "x_train")
    y = None if y_train is None else as_tensor(y_train, "y_train")
    if y is not None and len(y) != len(x):
        raise InvalidInput(f"x_train has {len(x)} rows but y_train has {len(y)}")
    pairs = _check_feature_pairs(teacher, student, feature_pairs)
    torch.manual_seed(seed)
    model, teacher_was_training = copy.deepcopy(student), teacher.training
    teacher.eval()
    try:
        with capture_outputs(teacher, [t for t, _ in pairs]) as t_feats, \
                capture_outputs(model, [s for _, s in pairs]) as s_feats:
            projections = _build_projections(teacher, model, x[:batch_size], pairs, t_feats, s_feats)

            def batch_loss(idx: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    t_out = teacher(x[idx])
                s_out = model(x[idx])
                loss = soft_target_loss(s_out, t_out, temperature)
                if y is not None:
                    loss = alpha * loss + (1 - alpha) * F.cross_entropy(s_out, y[idx])
                for projection, (t_name, s_name) in zip(projections, pairs):
                    loss = loss + feature_weight * feature_loss(projection(s_feats[s_name]), t_feats[t_name])
                return loss

            model.train(), projections.train()
            losses = fit([*model.parameters(), *projections.parameters()], batch_loss, len(x), epochs=epochs,
                         lr=lr, batch_size=batch_size, seed=seed, progress=progress, desc="distilling")
    finally:
        teacher.train(teacher_was_training)
    return _report(teacher, model.eval(), losses, pairs, projections.eval(), y is not None)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the ``temperature``-softened distributions, times temperature² (batch mean).

    The T² factor keeps the gradient scale independent of T (Hinton et al.), so ``alpha`` keeps its meaning.
    """
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean") * temperature ** 2


def feature_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between a projected student feature and the teacher's, divided by the teacher feature's mean square.

    The division makes the term scale-free: raw activations can be large enough for their MSE to drown
    the output loss, and layers of different scale then weigh alike under one ``feature_weight``.
    """
    return F.mse_loss(projected, target) / target.pow(2).mean().clamp(min=1e-8)


def width_student(teacher: nn.Module, example_inputs: ExampleInputs, multiplier: float,
                  ignored_layers: IgnoredLayers = None) -> nn.Module:
    """A student that is ``teacher`` with every prunable layer's width scaled by ``multiplier`` (0 < m <= 1).

    Built by structured pruning of a deep copy (``prune_structured`` with ratio 1 − ``multiplier``), so it
    works for any architecture Torch-Pruning traces from ``example_inputs``; the classifier keeps its
    outputs. The student KEEPS the teacher's weights of the channels with the largest L2 norm (a warm
    start, not re-initialised). Raises InvalidInput if ``multiplier`` is not in (0, 1].
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not 0 < multiplier <= 1:
        raise InvalidInput(f"multiplier must be in (0, 1] (0.5 keeps half the channels), got {multiplier!r}")
    if multiplier == 1:
        example_args(example_inputs)
        return copy.deepcopy(teacher)
    return prune_structured(teacher, example_inputs, 1 - multiplier, ignored_layers=ignored_layers).module


@contextlib.contextmanager
def capture_outputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, each forward pass of ``module`` stores the output of each named submodule in the yielded dict.

    Raises InvalidInput if a name is not a submodule of ``module``, or (during a forward pass) if a
    named submodule returns something other than a tensor.
    """
    layers = dict(module.named_modules())
    missing = [name for name in names if name not in layers]
    if missing:
        raise InvalidInput(f"the module has no submodule named {missing[0]!r}")
    outputs: dict[str, torch.Tensor] = {}

    def store(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise InvalidInput(f"feature layer {name!r} returns {type(output).__name__}, not a tensor")
            outputs[name] = output
        return hook

    hooks = [layers[name].register_forward_hook(store(name)) for name in names]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def _check_distill_args(temperature: float, alpha: float, feature_weight: float) -> None:
    if not temperature > 0:
        raise InvalidInput(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise InvalidInput(f"alpha must be between 0 and 1, got {alpha}")
    if not feature_weight >= 0:
        raise InvalidInput(f"feature_weight must be >= 0, got {feature_weight}")


def _check_feature_pairs(teacher: nn.Module, student: nn.Module, feature_pairs) -> list[FeaturePair]:
    pairs = [tuple(pair) for pair in feature_pairs or ()]
    teacher_names, student_names = dict(teacher.named_modules()), dict(student.named_modules())
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidInput(f"feature_pairs entries must be (teacher_layer, student_layer) names, got {pair!r}")
        if pair[0] not in teacher_names:
            raise InvalidInput(f"feature_pairs names teacher layer {pair[0]!r}, which the teacher does not have")
        if pair[1] not in student_names:
            raise InvalidInput(f"feature_pairs names student layer {pair[1]!r}, which the student does not have")
    return pairs


def _build_projections(teacher, student, x_probe, pairs, t_feats, s_feats) -> nn.ModuleList:
    """One projection per pair mapping the student's feature to the teacher's shape, sized by a probe pass."""
    with torch.no_grad():
        t_out, s_out = teacher(x_probe), student.eval()(x_probe)
    if t_out.shape != s_out.shape:
        raise InvalidInput(f"the student's output shape {tuple(s_out.shape)} differs from the teacher's {tuple(t_out.shape)}")
    projections = nn.ModuleList()
    for t_name, s_name in pairs:
        t_feat, s_feat = t_feats[t_name], s_feats[s_name]
        if s_feat.ndim == 4:
            projection = nn.Conv2d(s_feat.shape[1], t_feat.shape[1], kernel_size=1)
        else:
            projection = nn.Linear(s_feat.shape[-1], t_feat.shape[-1])
        with torch.no_grad():
            projected_shape = projection(s_feat).shape if s_feat.ndim == t_feat.ndim else None
        if projected_shape != t_feat.shape:
            raise InvalidInput(
                f"feature_pairs ({t_name!r}, {s_name!r}): the student feature {tuple(s_feat.shape)} cannot be "
                f"projected to the teacher's {tuple(t_feat.shape)} (only the channel / last axis may differ)"
            )
        projections.append(projection)
    return projections


def _report(teacher, student, losses, pairs, projections, labelled: bool) -> DistillReport:
    teacher_params, student_params = count_params(teacher), count_params(student)
    notes = [
        f"student has {student_params:,} parameters, {student_params / teacher_params:.1%} of the teacher's {teacher_params:,}",
        "trained on the teacher's soft targets" + (" and the hard labels" if labelled else " only (no labels given)"),
    ]
    if pairs:
        notes.append(f"feature distillation on {len(pairs)} layer pair(s); their projections "
                     f"({count_params(projections):,} parameters) are training-only and not part of the student")
    return DistillReport(student, tuple(losses), teacher_params, student_params, tuple(pairs),
                         projections if pairs else None, tuple(notes))
