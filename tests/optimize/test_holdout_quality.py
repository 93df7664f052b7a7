"""optimize chooses on a selection part of the evaluation data and reports quality on held-out rows:
both figures, labelled, in the result, the report and the manifest; --holdout DATA used when given."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from leanserve.cli import main
from leanserve.errors import InvalidInput
from leanserve.optimize.recipe import parse_recipe
from leanserve.optimize.run import optimize


def _linear_digits_model(path, digits):
    """A one-layer classifier with the CNN's signature (image -> logits), fitted by least squares on the
    training digits: far faster than the CNN and still well above chance, so it wins any wide budget."""
    x_train, _, y_train, _ = digits
    flat = x_train.reshape(len(x_train), -1).astype(np.float64)
    weights = np.linalg.lstsq(np.c_[flat, np.ones(len(flat))], np.eye(10)[y_train], rcond=None)[0].astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "linear", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[onnx.numpy_helper.from_array(weights[:-1], "w"), onnx.numpy_helper.from_array(weights[-1], "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def linear_variant(tmp_path, digits):
    return {"linear": _linear_digits_model(tmp_path / "linear.onnx", digits)}


def test_optimize_chooses_on_selection_and_grades_every_candidate_on_held_out_rows(cnn_repo, digits_data, tmp_path):
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", calib_path=digits_data / "calib.npz",
                       recipes=[parse_recipe("dynamic_int8")], max_drop="100%", time_budget_s=120, progress=False,
                       register=False, report_dir=tmp_path / "report", holdout_fraction=0.3, seed=4)
    result = outcome.result
    assert result.holdout.to_dict() == {"source": "split", "selection_rows": 140, "holdout_rows": 60, "seed": 4,
                                        "holdout_fraction": 0.3, "stratified": True}
    for candidate in [result.baseline, *result.candidates]:
        assert 0.5 < candidate.holdout_quality <= 1.0 and candidate.holdout_drop is not None
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["holdout"]["holdout_rows"] == 60
    assert {"selection_top1", "selection_drop", "holdout_top1", "holdout_drop"} <= set(report["candidates"][0])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| selection top1 | selection drop | held-out top1 | held-out drop |" in markdown
    assert "selection part (140 rows)" in markdown and "held-out part (60 rows, 30% of the evaluation rows" in markdown


def test_registered_version_carries_both_figures_labelled_and_the_skipped_recipes(cnn_repo, digits_data, linear_variant):
    # time budget 0: the ready-made variant is measured, every recipe is skipped for time
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", recipes=[parse_recipe("dynamic_int8")],
                       variants=linear_variant, max_drop="100%", time_budget_s=0, progress=False)
    assert outcome.result.skipped == ["dynamic_int8"] and outcome.result.chosen.recipe.name == "linear"
    metrics = cnn_repo.get("cnn", outcome.ref.version).manifest.metrics
    assert metrics["selection_top1"] == outcome.result.chosen.measurement.quality
    assert metrics["holdout_top1"] == outcome.result.chosen.holdout_quality
    assert {"selection_top1_drop", "holdout_top1_drop", "baseline_selection_top1", "baseline_holdout_top1"} <= set(metrics)
    assert metrics["holdout_split"]["selection_rows"] == 140 and metrics["holdout_split"]["holdout_rows"] == 60
    assert metrics["recipes_skipped_time_budget"] == ["dynamic_int8"]


def test_holdout_file_is_used_whole_when_given(cnn_repo, digits_data, digits, digits_cnn_onnx, tmp_path):
    import onnxruntime as ort

    _, x_test, _, y_test = digits
    np.savez(tmp_path / "held.npz", image=x_test[200:250], labels=y_test[200:250])
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", holdout_path=tmp_path / "held.npz",
                       recipes=[], max_drop="1%", progress=False, register=False, time_budget_s=60)
    info = outcome.result.holdout
    assert (info.source, info.selection_rows, info.holdout_rows, info.seed) == ("given", 200, 50, None)
    logits = ort.InferenceSession(str(digits_cnn_onnx)).run(None, {"image": x_test[200:250]})[0]
    assert outcome.result.baseline.holdout_quality == pytest.approx(np.mean(logits.argmax(1) == y_test[200:250]))


def test_too_few_rows_to_hold_some_out_are_refused_with_the_numbers(cnn_repo, digits, tmp_path):
    _, x_test, _, y_test = digits
    np.savez(tmp_path / "small.npz", image=x_test[:20], labels=y_test[:20])
    with pytest.raises(InvalidInput, match=r"20 rows.*14 selection and 6 held-out.*at least 10"):
        optimize(cnn_repo, "cnn", eval_path=tmp_path / "small.npz", progress=False)


def test_optimize_command_prints_both_figures_and_skipped_recipes(capsys, cnn_repo, digits_data, tmp_path):
    code = main(["optimize", "cnn", "--eval", str(digits_data / "eval.npz"), "--recipe", "static_int8",
                 "--time-budget", "0", "--holdout-fraction", "0.25", "--seed", "1", "--report-dir", str(tmp_path / "r"),
                 "--dry-run", "--repo", str(cnn_repo.root)])
    out = capsys.readouterr().out
    assert code == 0
    assert "data: selection 150 rows, held-out 50 rows (25% split, seed 1, by label)" in out
    assert "baseline: top1 selection=" in out and "held-out=" in out
    assert "not tried, the time budget (--time-budget) was spent: static_int8" in out
    assert "Not tried, the time budget was spent: static_int8." in (tmp_path / "r" / "report.md").read_text()
