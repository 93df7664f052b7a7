import onnx
import pytest
import torch
from torch import nn

from leanserve.errors import InvalidInput
from leanserve.from_torch import export
from leanserve.optimize.prune import iterative_prune_and_finetune, prune_structured, prune_unstructured
from leanserve.optimize.train import count_params, top1_accuracy


@pytest.fixture(scope="module")
def trained(digits, digits_teacher):
    """The demo CNN trained on the real digits, and its held-out accuracy (about 0.97)."""
    _, x_test, _, y_test = digits
    return digits_teacher, top1_accuracy(digits_teacher, x_test, y_test)


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_structured_pruning_removes_half_the_channels_and_exports_smaller(trained, digits, tmp_path):
    model, _ = trained
    x_test = torch.from_numpy(digits[1])
    report = prune_structured(model, x_test[:2], 0.5)
    assert _conv_widths(model) == [16, 32]  # the argument is untouched
    assert _conv_widths(report.module) == [8, 16]
    linears = [m for m in report.module.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [32, 10]  # the classifier keeps its 10 classes
    assert report.params_after == count_params(report.module) < 0.3 * report.params_before
    assert report.macs_after < 0.35 * report.macs_before
    assert report.module(x_test).shape == (len(x_test), 10)
    before = export(model, x_test[:2], tmp_path / "dense.onnx")
    after = export(report.module, x_test[:2], tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(after.path))
    assert after.path.stat().st_size < 0.35 * before.path.stat().st_size


def test_structured_pruning_leaves_ignored_layers_whole(trained, digits):
    model, _ = trained
    report = prune_structured(model, torch.from_numpy(digits[1][:2]), 0.5, ignored_layers=["0"])
    assert _conv_widths(report.module) == [16, 16]


def test_iterative_pruning_with_finetuning_recovers_accuracy(trained, digits):
    x_train, x_test, y_train, y_test = digits
    model, dense_accuracy = trained
    example = torch.from_numpy(x_test[:2])
    cut_only = prune_structured(model, example, 0.75)
    report = iterative_prune_and_finetune(model, example, x_train, y_train, 0.75, steps=3, epochs_per_step=2,
                                          lr=2e-3, progress=False)
    assert report.params_after == cut_only.params_after < 0.1 * report.params_before
    assert top1_accuracy(cut_only.module, x_test, y_test) < dense_accuracy - 0.1  # removing 3/4 of channels hurts
    assert top1_accuracy(report.module, x_test, y_test) >= dense_accuracy - 0.03  # ...and fine-tuning recovers
    assert len(report.losses) == 6 and len(report.notes) == 4


def test_unstructured_pruning_reaches_the_requested_sparsity_but_only_compression_shrinks_it(trained):
    model, _ = trained
    report = prune_unstructured(model, 0.7)
    assert report.sparsity == pytest.approx(0.7, abs=1e-4)
    assert {k: v.shape for k, v in report.module.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert report.params_after == report.params_before and report.nonzero_params_after < 0.35 * report.params_before
    assert not any("_orig" in key or "_mask" in key for key in report.module.state_dict())  # made permanent
    assert report.gzip_bytes_after < 0.6 * report.gzip_bytes_before
    assert "not faster" in report.notes[0]
    assert all(bool((p != 0).all()) for p in model.parameters() if p.ndim > 1)  # the argument is untouched


@pytest.mark.parametrize("call, argument", [
    (lambda m, x: prune_unstructured(m, 1.5), "amount"),
    (lambda m, x: prune_structured(m, x, -1), "ratio"),
    (lambda m, x: prune_structured(m, x, 0.5, ignored_layers=["no.such.layer"]), "ignored_layers"),
    (lambda m, x: prune_structured(m, x, 0.5, round_to=0), "round_to"),
    (lambda m, x: prune_structured(m, "not a tensor", 0.5), "example_inputs"),
    (lambda m, x: iterative_prune_and_finetune(m, x, x, torch.zeros(2, dtype=torch.long), 0.5, steps=0), "steps"),
])
def test_bad_arguments_raise_invalid_input_naming_them(call, argument):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(InvalidInput, match=argument):
        call(model, torch.zeros(2, 1, 28, 28))
