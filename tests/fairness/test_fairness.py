"""Fairness: Fairlearn's per-group figures from delayed labels, and mitigation as a served version.

Two data sets: scikit-learn's diabetes data (group: the sex column; label: the target above its
median), and a synthetic set whose served model adds a bonus to one group on purpose.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import onnx.numpy_helper
import orjson
import pytest
from onnx import TensorProto, helper

pytest.importorskip("fairlearn")

from leanserve import Repository, load  # noqa: E402
from leanserve.errors import InvalidInput  # noqa: E402
from leanserve.fairness.feedback import Feedback  # noqa: E402
from leanserve.fairness.metrics import fairness_by_version, fairness_report  # noqa: E402
from leanserve.fairness.mitigate import fit_optimizer, mitigate, rules_from  # noqa: E402
from leanserve.fairness.postprocessed import GROUP_INPUT, PROBABILITY_OUTPUT, positive_score  # noqa: E402


# --- data and models --------------------------------------------------------------------------------

def logistic_onnx(path: Path, weights: np.ndarray, bias: float) -> Path:
    """x FP32 [-1, F] -> logits FP32 [-1, 2] = [0, x.w + b]: a logistic regression as two class scores."""
    w = np.zeros((len(weights), 2), np.float32)
    w[:, 1] = weights
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["logits"])], "logistic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(weights)])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array([0, bias], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def diabetes():
    """Features (FP32, standardized), labels (target above its median) and groups (sex 1 or 2)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    groups = np.where(x[:, 1] == 1, "sex1", "sex2")
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return x, (y > np.median(y)).astype(np.int64), groups


def synthetic(rows: int, seed: int):
    """Two features drive the label the same way in both groups; the third feature is group membership."""
    rng = np.random.default_rng(seed)
    groups = np.where(rng.random(rows) < 0.5, "a", "b")
    signal = rng.standard_normal((rows, 2))
    labels = (signal[:, 0] + 0.5 * signal[:, 1] + 0.7 * rng.standard_normal(rows) > 0).astype(np.int64)
    x = np.column_stack([signal, groups == "a"]).astype(np.float32)
    return x, labels, groups


SYNTHETIC_BIAS = np.array([2.0, 1.0, 1.5], np.float32)  # +1.5 to the logit of group "a": the injected bias


def served(repo: Repository, tmp_path: Path, name: str, weights: np.ndarray, bias: float = 0.0) -> None:
    repo.add(logistic_onnx(tmp_path / f"{name}.onnx", weights, bias), name)


def feedback_of(model, x, labels, groups) -> Feedback:
    """What the prediction log holds after serving ``x`` and receiving ``labels``: the served scores."""
    scores = model.predict({"x": x})["logits"]
    return Feedback({"x": x}, scores, labels, np.asarray(groups))


def mitigated_decisions(model, x, groups) -> np.ndarray:
    """Decisions of a post-processed version through its engine (the group as the server passes it)."""
    index = model.session.group_indices(groups)
    return model.predict({"x": x, GROUP_INPUT: index})["logits"].argmax(axis=1)


# --- figures ----------------------------------------------------------------------------------------

def test_fairness_report_gives_fairlearn_rates_and_gaps_per_group():
    y_true = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    y_pred = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    report = fairness_report(y_true, y_pred, ["a"] * 4 + ["b"] * 4)
    a, b = report.groups
    assert (a.selection_rate, a.true_positive_rate, a.false_positive_rate, a.accuracy) == (0.75, 1.0, 0.5, 0.75)
    assert (b.selection_rate, b.true_positive_rate, b.false_positive_rate, b.accuracy) == (0.25, 0.5, 0.0, 0.75)
    assert report.demographic_parity_difference == pytest.approx(0.5)
    assert report.equalized_odds_difference == pytest.approx(0.5)


def test_monitor_figures_per_version_skip_small_groups_and_other_outputs():
    def row(version, group, label, positive):
        return {"version": version, "group": group, "label": np.array([label]),
                "outputs": {"p": np.array([[0.2, 0.8]] if positive else [[0.8, 0.2]], np.float32)}}

    rows = [row(1, "a", i % 2, True) for i in range(40)] + [row(1, "b", i % 2, i % 2 == 1) for i in range(40)]
    rows += [row(1, "tiny", 1, True) for _ in range(5)]
    rows += [{"version": 2, "group": "a", "label": np.array([1]), "outputs": {"y": np.zeros((1, 4), np.float32)}}] * 40
    reports = fairness_by_version(rows)
    assert set(reports) == {1}
    assert [g.group for g in reports[1].groups] == ["a", "b"]
    assert reports[1].demographic_parity_difference == pytest.approx(0.5)
    assert reports[1].equalized_odds_difference == pytest.approx(1.0)  # FPR 1.0 in a, 0.0 in b


def test_fairness_gap_alert_rules_fire_above_their_limits():
    from leanserve.config import AlertConfig
    from leanserve.monitor.alerts import evaluate

    figures = {"demographic_parity_difference": 0.3, "equalized_odds_difference": 0.25}
    fired = {a.rule for a in evaluate("m", 1, figures, AlertConfig(max_demographic_parity_difference=0.2))}
    assert fired == {"demographic_parity_difference", "equalized_odds_difference"}
    assert not evaluate("m", 1, figures, AlertConfig(max_equalized_odds_difference=0.3))


# --- mitigation -------------------------------------------------------------------------------------

def test_served_rule_gives_fairlearns_probabilities():
    x, labels, groups = synthetic(2000, seed=1)
    scores = np.column_stack([np.zeros(len(x)), x @ SYNTHETIC_BIAS])
    for constraint in ("demographic_parity", "equalized_odds"):
        optimizer = fit_optimizer(scores, labels, groups, constraint)
        rules = rules_from(optimizer)
        ours = np.concatenate([rules[g].positive_probability(positive_score(scores[groups == g])) for g in ("a", "b")])
        order = np.concatenate([np.flatnonzero(groups == g) for g in ("a", "b")])
        theirs = optimizer._pmf_predict(positive_score(scores)[:, None], sensitive_features=groups)[order, 1]
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("constraint", ["demographic_parity", "equalized_odds"])
def test_mitigation_halves_an_injected_gap_on_held_out_data(repo, tmp_path, constraint):
    served(repo, tmp_path, "credit", SYNTHETIC_BIAS)
    base = load("credit", repo=repo)
    report = mitigate(repo, "credit", group_parameter="applicant_group", constraint=constraint,
                      feedback=feedback_of(base, *synthetic(3000, seed=2)))
    assert report.version == 2 and report.canary
    assert repo.config("credit").rollout.canary == 2 and repo.config("credit").rollout.primary == 1

    x, labels, groups = synthetic(4000, seed=3)  # never seen by the model or the fit
    before = fairness_report(labels, base.predict({"x": x})["logits"].argmax(axis=1), groups)
    after = fairness_report(labels, mitigated_decisions(load("credit", 2, repo=repo), x, groups), groups)
    gap = report.gap_of
    print(f"synthetic, {constraint}: gap {gap(before):.3f} -> {gap(after):.3f}, "
          f"accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}")
    assert gap(before) > 0.2
    assert gap(after) <= 0.5 * gap(before)
    assert before.accuracy - after.accuracy < 0.1  # the cost, printed above
    assert report.gap_after <= 0.5 * report.gap_before  # the report's own held-out (cross-fitted) figures


def test_mitigation_halves_the_equalized_odds_gap_on_diabetes_held_out(repo, tmp_path):
    from sklearn.linear_model import LogisticRegression

    # 442 rows are too few to split into training, feedback and test sets with gaps above noise: the
    # served model is fitted on all of them, and its feedback is held out from each threshold rule by
    # the report's 5-fold cross-fitting.
    x, labels, groups = diabetes()
    fitted = LogisticRegression(max_iter=2000).fit(x, labels)
    served(repo, tmp_path, "diabetes", fitted.coef_[0].astype(np.float32), float(fitted.intercept_[0]))
    report = mitigate(repo, "diabetes", constraint="equalized_odds",
                      feedback=feedback_of(load("diabetes", repo=repo), x, labels, groups))
    print("\n" + report.to_text())
    assert report.gap_before > 0.1
    assert report.gap_after <= 0.5 * report.gap_before
    assert report.before.accuracy - report.after.accuracy < 0.05


def test_post_processed_version_reads_the_group_from_a_request_parameter(repo, tmp_path, live_server_factory):
    served(repo, tmp_path, "credit", SYNTHETIC_BIAS)
    x, labels, groups = synthetic(600, seed=4)
    mitigate(repo, "credit", group_parameter="applicant_group", constraint="demographic_parity",
             feedback=feedback_of(load("credit", repo=repo), x, labels, groups))
    server = live_server_factory(repo.root)
    url = server.url + "/v2/models/credit/versions/2/infer"

    def body(**parameters):
        return orjson.dumps({"parameters": parameters, "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x[:2].ravel().tolist()}]})

    ok = httpx.post(url, content=body(applicant_group="b"))
    assert ok.status_code == 200, ok.text
    outputs = {o["name"]: o["data"] for o in ok.json()["outputs"]}
    assert set(outputs) == {"logits", PROBABILITY_OUTPUT} and all(v in (0, 1) for v in outputs["logits"])
    missing = httpx.post(url, content=body(group="b"))
    assert missing.status_code == 400 and "'applicant_group'" in missing.json()["error"]
    unknown = httpx.post(url, content=body(applicant_group="c"))
    assert unknown.status_code == 400 and "'c'" in unknown.json()["error"] and "never seen" in unknown.json()["error"]


def test_mitigate_refuses_too_little_feedback_naming_the_group(repo, tmp_path):
    served(repo, tmp_path, "credit", SYNTHETIC_BIAS)
    x, labels, groups = synthetic(200, seed=5)
    keep = (groups == "a") | (np.arange(len(x)) < 20)
    with pytest.raises(InvalidInput, match=r"too little feedback.*group 'b' has \d+ labelled predictions \(needs 30\)"):
        mitigate(repo, "credit", feedback=feedback_of(load("credit", repo=repo), x[keep], labels[keep], groups[keep]))
    with pytest.raises(InvalidInput, match="only 1 group"):
        mitigate(repo, "credit", feedback=feedback_of(load("credit", repo=repo), x[groups == "a"], labels[groups == "a"],
                                                       groups[groups == "a"]))
    assert repo.versions("credit") == [1]


def test_mitigate_cli_reads_the_prediction_log_and_names_what_is_missing(repo, tmp_path, capsys):
    from leanserve.cli import main
    from leanserve.monitor.store import LogConfig, PredictionLog

    served(repo, tmp_path, "credit", SYNTHETIC_BIAS)
    db = tmp_path / "predictions.db"
    assert main(["mitigate", "credit", "--repo", str(repo.root), "--db", str(db)]) == 1
    assert "no prediction log" in capsys.readouterr().err

    x, labels, groups = synthetic(300, seed=6)
    scores = load("credit", repo=repo).predict({"x": x})["logits"]
    plog = PredictionLog(LogConfig(db))
    for i in range(len(x)):
        plog.record("credit", 1, f"r{i}", {"x": x[i:i + 1]}, {"logits": scores[i:i + 1]}, 1.0, group=str(groups[i]))
    plog.flush()
    plog.feedback("credit", [(f"r{i}", int(labels[i])) for i in range(len(x)) if groups[i] == "a" or i < 100])
    plog.close()
    assert main(["mitigate", "credit", "--repo", str(repo.root), "--db", str(db), "--min-per-group", "60"]) == 1
    assert "group 'b' has" in capsys.readouterr().err

    code = main(["mitigate", "credit", "--repo", str(repo.root), "--db", str(db), "--min-per-group", "20",
                 "--constraint", "equalized_odds"])
    out = capsys.readouterr().out
    assert code == 0 and "version 1 -> 2" in out and "equalized odds difference" in out and "guarded canary" in out
    assert repo.get("credit", 2).manifest.format == "postprocessed"


def test_mitigate_refuses_a_model_that_is_not_a_binary_classifier(affine_repo):
    with pytest.raises(InvalidInput, match=r"two class scores"):
        mitigate(affine_repo, "affine", feedback=Feedback({}, np.zeros((0, 2)), np.zeros(0), np.zeros(0)))


def test_mitigate_refuses_a_rule_whose_held_out_gap_grows_and_force_registers_it(repo, tmp_path, caplog):
    from leanserve.derived import WorseThanParent

    served(repo, tmp_path, "fair", np.array([2.0, 1.0, 0.0], np.float32), 9.0)  # approves everyone: no gap to close
    feedback = feedback_of(load("fair", repo=repo), *synthetic(400, seed=2))
    with pytest.raises(WorseThanParent, match=r"held-out equalized_odds_difference 0\.\d+ against 0\.0000 .*--force"):
        mitigate(repo, "fair", constraint="equalized_odds", feedback=feedback)
    assert repo.versions("fair") == [1]
    report = mitigate(repo, "fair", constraint="equalized_odds", feedback=feedback, force=True, canary=False)
    assert report.version == 2 and "registered anyway (--force)" in caplog.text
    assert "worse than its parent" in repo.get("fair", 2).manifest.metrics["registered_with_force"]
