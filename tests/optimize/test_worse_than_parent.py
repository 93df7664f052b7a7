"""optimize registers a variant only when its held-out quality is within the budget of the original's; --force
registers a worse one with a warning recorded in its manifest."""

import numpy as np
import pytest

from leanserve.derived import WorseThanParent
from leanserve.optimize.run import optimize
from test_holdout_quality import _linear_digits_model


@pytest.fixture
def rows_the_variant_gets_wrong(tmp_path, digits, digits_cnn_onnx):
    """A held-out file of digits the original classifies right and the linear variant wrong: the variant is
    within a wide budget (80 points) on the selection rows and fails every held-out row."""
    import onnxruntime as ort

    x_train, x_test, y_train, y_test = digits
    linear = _linear_digits_model(tmp_path / "linear.onnx", digits)
    x, y = np.concatenate([x_test[200:], x_train]), np.concatenate([y_test[200:], y_train])
    cnn = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x})[0].argmax(1)
    lin = ort.InferenceSession(str(linear)).run(None, {"image": x})[0].argmax(1)
    pick = (cnn == y) & (lin != y)
    assert pick.sum() >= 10
    np.savez(tmp_path / "held.npz", image=x[pick], labels=y[pick])
    return {"linear": linear}, tmp_path / "held.npz"


def _optimize(repo, data, variants, held, **kw):
    return optimize(repo, "cnn", eval_path=data / "eval.npz", holdout_path=held, recipes=[], variants=variants,
                    max_drop="80%", time_budget_s=60, progress=False, **kw)


def test_a_variant_worse_on_held_out_rows_than_the_budget_is_refused(cnn_repo, digits_data, rows_the_variant_gets_wrong):
    variants, held = rows_the_variant_gets_wrong
    with pytest.raises(WorseThanParent, match=r"\(linear\) is worse than its parent: held-out top1 0\.0000 against "
                                              r"1\.0000 .*budget 0\.8000.*--force registers it anyway"):
        _optimize(cnn_repo, digits_data, variants, held)
    assert cnn_repo.versions("cnn") == [1]


def test_force_registers_the_worse_variant_and_records_the_warning(cnn_repo, digits_data, rows_the_variant_gets_wrong,
                                                                  caplog):
    variants, held = rows_the_variant_gets_wrong
    outcome = _optimize(cnn_repo, digits_data, variants, held, force=True)
    assert outcome.ref.version == 2 and outcome.result.chosen.recipe.name == "linear"
    metrics = cnn_repo.get("cnn", 2).manifest.metrics
    assert metrics["holdout_top1"] == 0.0 and "registered anyway (--force)" in metrics["registered_with_force"]
    assert "is worse than its parent" in caplog.text
