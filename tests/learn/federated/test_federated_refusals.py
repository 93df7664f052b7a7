"""A federated result is judged on the server's held-out figures before it is registered: worse than the start
needs force; a collapse (non-finite weights, one class for every row) is refused even with force."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flwr")

from leanserve.derived import Collapsed, WorseThanParent  # noqa: E402
from leanserve.learn.federated import core as federated  # noqa: E402
from leanserve.learn.federated.server import RoundSettings, RoundsOutcome  # noqa: E402
from test_federated import _untrained_cnn_repo  # noqa: E402


@pytest.fixture
def start(tmp_path, digits):
    repo = _untrained_cnn_repo(tmp_path)
    from leanserve.torch_source import load_source

    module = load_source(repo.get("cnn", 1))
    _, x_test, _, y_test = digits
    held_out = federated.TrainingData("image", x_test[:60], y_test[:60])
    return repo, module, held_out


def _register(repo, module, state, accuracy, held_out, force=False):
    outcome = RoundsOutcome(state_dict=state, accuracy=accuracy)
    return federated.register_federated(repo, repo.resolve("cnn", 1), module, outcome, RoundSettings(rounds=1),
                                        held_out.x[:2], canary=False, held_out=held_out, force=force)


def _varied(module):
    """Weights under which the CNN does not give one class for every row (checked by the caller's data)."""
    torch.manual_seed(1)
    return {k: torch.randn_like(v) * 0.3 if v.dtype.is_floating_point else v for k, v in module.state_dict().items()}


def test_a_result_worse_than_the_start_is_refused_and_force_registers_it(start, caplog):
    repo, module, held_out = start
    state = _varied(module)
    with pytest.raises(WorseThanParent, match=r"held-out accuracy 0\.8300 against 0\.9000 .*no budget given.*--force"):
        _register(repo, module, state, [0.90, 0.83], held_out)
    assert repo.versions("cnn") == [1]
    result = _register(repo, module, state, [0.90, 0.83], held_out, force=True)
    assert result.ref.version == 2 and "registered anyway (--force)" in caplog.text


def test_non_finite_weights_are_refused_even_with_force(start):
    repo, module, held_out = start
    state = {k: v.clone() for k, v in module.state_dict().items()}
    next(v for v in state.values() if v.dtype.is_floating_point).view(-1)[0] = float("nan")
    with pytest.raises(Collapsed, match="not finite.*--force does not register a collapse"):
        _register(repo, module, state, [0.1, 0.5], held_out, force=True)
    assert repo.versions("cnn") == [1]


def test_a_model_that_answers_one_class_is_refused_even_with_force(start):
    repo, module, held_out = start
    state = {k: torch.zeros_like(v) if v.dtype.is_floating_point else v for k, v in module.state_dict().items()}
    last_bias = [k for k in state if k.endswith("bias")][-1]
    state[last_bias][3] = 1.0
    with pytest.raises(Collapsed, match="predicts class 3 for all 60 held-out rows"):
        _register(repo, module, state, [0.1, 0.5], held_out, force=True)
    assert repo.versions("cnn") == [1]
