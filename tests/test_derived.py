"""Derived versions against their parents: worse beyond the budget is refused unless forced; a collapse never
registers."""

import math

import numpy as np
import pytest

from leanserve.derived import Collapsed, HeldOut, WorseThanParent, check_not_collapsed, check_not_worse, collapse_reason


def test_a_drop_within_the_budget_is_not_worse():
    assert check_not_worse(HeldOut("top1", parent=0.97, derived=0.966, allowed_drop=0.005)) is None


def test_a_drop_beyond_the_budget_is_refused_naming_both_figures_and_force():
    with pytest.raises(WorseThanParent, match=r"held-out top1 0\.9000 against 0\.9700 .*budget 0\.0050.*--force registers"):
        check_not_worse(HeldOut("top1", parent=0.97, derived=0.90, allowed_drop=0.005))


def test_without_a_budget_any_drop_is_worse():
    with pytest.raises(WorseThanParent, match="no budget given"):
        check_not_worse(HeldOut("accuracy", parent=0.994, derived=0.983))


def test_lower_is_better_figures_are_worse_when_they_rise():
    assert check_not_worse(HeldOut("gap", 0.2, 0.1, higher_is_better=False)) is None
    with pytest.raises(WorseThanParent, match="rise 0.1000"):
        check_not_worse(HeldOut("gap", 0.1, 0.2, higher_is_better=False))


def test_force_registers_a_worse_version_with_a_warning(caplog):
    warning = check_not_worse(HeldOut("top1", 0.97, 0.90, 0.005), force=True, what="the variant")
    assert "registered anyway (--force)" in warning and warning in caplog.text


def test_a_figure_that_is_not_a_number_is_worse():
    assert HeldOut("cosine", 1.0, math.nan, 0.01).worse


def test_collapse_reasons_non_finite_weights_constant_predictions_and_chance():
    assert "not finite" in collapse_reason(weights=[np.ones(3), np.array([1.0, np.nan])])
    assert "predicts class 3 for all 5" in collapse_reason(predictions=np.full(5, 3))
    assert "at or below chance" in collapse_reason(held_out_accuracy=0.1, classes=10)
    assert collapse_reason(held_out_accuracy=0.6, classes=10, predictions=np.arange(5), weights=[np.ones(2)]) is None


def test_force_does_not_register_a_collapse():
    with pytest.raises(Collapsed, match="--force does not register a collapse"):
        check_not_collapsed(held_out_accuracy=0.05, classes=10)
