"""The ONNX-side optimization search on the real digits CNN: recipes, budget, sensitivity, report, registration."""

import json

import numpy as np
import pytest

from leanserve import Repository
from leanserve.cli import main
from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.measure import choose_metric, cosine, quality_drop
from leanserve.optimize.recipe import parse_recipe
from leanserve.optimize.report import pareto_front
from leanserve.optimize.run import optimize
from leanserve.optimize.search import Budget, parse_budget


@pytest.mark.parametrize("text, budget", [("0.5%", Budget(0.005)), ("1%rel", Budget(0.01, True)), ("0.02", Budget(0.02))])
def test_budget_forms(text, budget):
    assert parse_budget(text) == budget


def test_bad_budget_and_recipe_are_refused():
    with pytest.raises(InvalidInput, match="--max-accuracy-drop"):
        parse_budget("half")
    with pytest.raises(InvalidInput, match="unknown optimization pass 'zip'"):
        parse_recipe("graph+zip")
    assert parse_recipe("graph:level=basic+static_int8:method=entropy,per_channel=false").steps[1].params == {
        "method": "entropy", "per_channel": False}


def test_metrics_and_drop_direction():
    assert choose_metric({"x": np.zeros(1)}) == "cosine"
    assert choose_metric({"labels": np.zeros(1, np.int64)}) == "top1"
    assert choose_metric({"labels": np.zeros(1, np.float32)}) == "mse"
    assert quality_drop("top1", 0.9, 0.8) == pytest.approx(0.1)
    assert quality_drop("mse", 0.1, 0.3) == pytest.approx(0.2)
    a = {"y": np.array([[1.0, 0.0], [0.0, 2.0]])}
    assert cosine(a, {}, a) == pytest.approx(1.0)


def test_pareto_front_keeps_only_undominated_points():
    assert pareto_front([(1.0, 0.9), (2.0, 0.95), (3.0, 0.93), (0.5, 0.5)]) == [3, 0, 1]


def test_search_registers_the_fastest_within_budget_with_report_and_provenance(cnn_repo, digits_data, tmp_path):
    recipes = [parse_recipe("static_int8"), parse_recipe("graph:level=extended")]
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", calib_path=digits_data / "calib.npz",
                       max_drop="0.5%", recipes=recipes, time_budget_s=120, progress=False,
                       report_dir=tmp_path / "report")
    result = outcome.result
    assert result.metric == "top1" and len(result.candidates) == 2
    static = result.candidates[0]
    assert static.measurement.size_bytes < 0.4 * result.baseline.measurement.size_bytes  # int8 weights
    assert static.drop <= 0.005  # issue 4: static int8 loses at most 0.5 points on digits (one row gained on AVX2)
    within = [c for c in [result.baseline, *result.candidates] if c.within_budget]
    assert result.chosen in within
    assert result.chosen.measurement.speed.latency_p50_ms == min(c.measurement.speed.latency_p50_ms for c in within)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["recipe"] for r in report["candidates"]] == ["original", "static_int8", "graph:level=extended"]
    assert (tmp_path / "report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    if outcome.ref is not None:
        manifest = cnn_repo.get("cnn", outcome.ref.version).manifest
        assert manifest.provenance.parent == "cnn:1" and manifest.provenance.recipe["steps"]
        assert {"report.md", "report.json", "pareto.png"} <= set(manifest.files)


def test_over_budget_quantization_keeps_sensitive_layers_in_float(cnn_repo, digits_data):
    # A budget of one millionth of cosine similarity: int8 of every layer breaks it, so the search ranks
    # layers by sensitivity and keeps the worst in float until the candidate fits (all 4 layers at worst).
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", calib_path=digits_data / "calib.npz",
                       metric="cosine", max_drop="0.000001", recipes=[parse_recipe("dynamic_int8")],
                       time_budget_s=120, progress=False, register=False)
    first, *rescued = outcome.result.candidates
    assert not first.within_budget
    assert rescued and all(c.kept_float for c in rescued)
    assert any("sensitivity:" in note for note in rescued[0].notes)
    assert len(rescued[-1].kept_float) >= len(rescued[0].kept_float)
    assert all(c.within_budget or c is not outcome.result.chosen for c in outcome.result.candidates)


def test_never_registers_outside_the_budget(cnn_repo, digits_data):
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", metric="cosine", max_drop="0",
                       recipes=[parse_recipe("int4_weights")], time_budget_s=60, progress=False)
    chosen = outcome.result.chosen
    assert chosen.within_budget and chosen.drop <= 0
    assert all(c is not chosen for c in outcome.result.candidates if not c.within_budget)
    assert cnn_repo.versions("cnn") == ([1] if outcome.ref is None else [1, 2])


def test_bad_data_is_refused_by_name(cnn_repo, tmp_path):
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(InvalidInput, match="no array for input 'image'"):
        optimize(cnn_repo, "cnn", eval_path=tmp_path / "wrong.npz", progress=False)
    np.savez(tmp_path / "ragged.npz", image=np.zeros((2, 1, 28, 28), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(InvalidInput, match="same, non-zero number of rows"):
        optimize(cnn_repo, "cnn", eval_path=tmp_path / "ragged.npz", progress=False)
    with pytest.raises(InvalidInput, match="expected an existing .npz"):
        optimize(cnn_repo, "cnn", eval_path=tmp_path / "missing.npz", progress=False)


def test_non_onnx_versions_are_refused(tmp_path):
    import torch

    from leanserve import TensorSpec

    path = tmp_path / "m.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    repo = Repository(tmp_path / "repo")
    repo.add(path, "ts", inputs=[TensorSpec.parse("x:FP32:-1,2")], outputs=[TensorSpec.parse("y:FP32:-1,2")])
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 2), np.float32))
    with pytest.raises(UnsupportedFormat, match="export it with leanserve export"):
        optimize(repo, "ts", eval_path=tmp_path / "e.npz", progress=False)


def test_optimize_command_prints_candidates_and_report(capsys, cnn_repo, digits_data, tmp_path):
    code = main(["optimize", "cnn", "--eval", str(digits_data / "eval.npz"), "--recipe", "static_int8",
                 "--time-budget", "60", "--report-dir", str(tmp_path / "r"), "--dry-run", "--repo", str(cnn_repo.root)])
    out = capsys.readouterr().out
    assert code == 0 and "baseline: top1 selection=" in out and "static_int8" in out and "report:" in out
    assert cnn_repo.versions("cnn") == [1]


def test_pytorch_variants_compete_in_the_same_search(cnn_repo, digits_data, tmp_path):
    import torch

    from leanserve.demo import digits_dataset, train_cnn
    from leanserve.optimize.run import torch_variants

    x_train, x_test, y_train, _ = digits_dataset()
    teacher = train_cnn(x_train, y_train, epochs=3, progress=False)
    variants = torch_variants(teacher, torch.from_numpy(x_test[:2]), x_train, y_train, tmp_path / "variants",
                              input_names=["image"], output_names=["logits"], epochs=2, progress=False)
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", recipes=[], variants=variants,
                       max_drop="5%", progress=False, register=False, time_budget_s=60)
    measured = {c.recipe.name: c for c in outcome.result.candidates}
    assert set(measured) == set(variants)
    for candidate in measured.values():
        assert candidate.measurement.size_bytes < outcome.result.baseline.measurement.size_bytes / 2
        assert candidate.measurement.quality > 0.85
