import pytest
import torch
from torch import nn

from leanserve.errors import InvalidInput
from leanserve.optimize.share import find_similar_layers, share_similar_layers


def _mlp_with_a_duplicated_layer() -> nn.Sequential:
    """Linear layers 2 and 4 are identical copies; layer 6 has the same shape but its own random weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4),
    )
    model[4].load_state_dict(model[2].state_dict())
    return model


def test_sharing_ties_the_duplicated_layers_and_not_the_dissimilar_one():
    model = _mlp_with_a_duplicated_layer()
    report = share_similar_layers(model)
    assert [(p.kept, p.tied) for p in report.pairs] == [("2", "4")]
    tied = report.module
    assert tied[4].weight is tied[2].weight and tied[4].bias is tied[2].bias
    assert tied[6].weight is not tied[2].weight
    assert report.params_saved == 64 * 64 + 64
    assert report.params_after == sum(p.numel() for p in tied.parameters())
    x = torch.randn(5, 8)
    assert torch.equal(tied(x), model(x))  # identical weights: tying is exact
    assert report.pairs[0].relative_difference == 0
    assert model[4].weight is not model[2].weight  # the argument is untouched


def test_the_onnx_export_of_tied_weights_is_measured():
    report = share_similar_layers(_mlp_with_a_duplicated_layer(), example_inputs=torch.randn(2, 8))
    saved_bytes = 4 * report.params_saved
    # torch 2.13's exporters write a shared parameter as one initializer; the report measures, not assumes
    assert report.onnx_bytes_before - report.onnx_bytes_after >= 0.9 * saved_bytes
    assert "stored once" in report.notes[-1]


def test_cosine_similarity_ignores_scale_so_the_relative_difference_is_reported():
    model = _mlp_with_a_duplicated_layer()
    with torch.no_grad():
        model[4].weight.mul_(2), model[4].bias.mul_(2)
    pairs = find_similar_layers(model, threshold=0.99)
    assert [(p.kept, p.tied) for p in pairs] == [("2", "4")]
    assert pairs[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert pairs[0].relative_difference == pytest.approx(0.5, abs=1e-5)


def test_nothing_is_shared_when_no_layers_are_similar():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1))
    report = share_similar_layers(model, threshold=0.9)
    assert report.pairs == () and report.params_saved == 0
    assert "no layers" in report.notes[0]


@pytest.mark.parametrize("threshold", [0, 1.5, -0.5])
def test_a_threshold_outside_zero_to_one_is_refused(threshold):
    with pytest.raises(InvalidInput, match="threshold"):
        find_similar_layers(nn.Linear(2, 2), threshold=threshold)
