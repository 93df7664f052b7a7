"""Engines as a dimension of the search: every (recipe, engine) candidate measured the same way, engines
checked against ONNX Runtime before a candidate counts, the winner registered with its engine."""

import json
import numpy as np
import pytest

from leanserve.cli import main
from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.optimize.recipe import Recipe, parse_engines, parse_recipe
from leanserve.optimize.run import optimize
from leanserve.measure import outputs_mismatch
from leanserve.runtime import ENGINES, load_session


def test_engine_lists_and_recipe_engines_parse_with_short_forms():
    assert parse_engines("ort, ov,tvm,ort") == ("onnxruntime", "openvino", "tvm")
    assert parse_recipe("@openvino").engine == "openvino" and parse_recipe("@openvino").steps == ()
    recipe = parse_recipe("graph:level=basic+static_int8@ort")
    assert recipe.engine == "onnxruntime" and [s.op for s in recipe.steps] == ["graph", "static_int8"]
    with pytest.raises(InvalidInput, match="unknown engine 'trt'.*known engines: onnxruntime"):
        parse_engines("ort,trt")
    with pytest.raises(InvalidInput, match="unknown engine 'gpu'"):
        parse_recipe("graph@gpu")


def test_outputs_mismatch_uses_a_tolerance_per_dtype():
    ref = {"y": np.array([[10.0, -4.0]], np.float32), "k": np.arange(200)}
    assert outputs_mismatch({"y": ref["y"] + 5e-3, "k": ref["k"]}, ref) is None  # 5e-4 of the scale
    assert "largest difference" in outputs_mismatch({"y": ref["y"] + 0.1, "k": ref["k"]}, ref)
    assert outputs_mismatch({"y": ref["y"] + 0.1, "k": ref["k"]}, ref, loose=True) is None  # int8 on both sides
    two_off = ref["k"].copy()
    two_off[:3] += 1
    assert "1.5% of elements differ" in outputs_mismatch({"y": ref["y"], "k": two_off}, ref)
    assert "shape" in outputs_mismatch({"y": ref["y"][0], "k": ref["k"]}, ref)


def test_openvino_candidates_are_measured_beside_onnx_runtime_and_the_winner_keeps_its_engine(cnn_repo, digits_data, tmp_path):
    pytest.importorskip("openvino")
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", max_drop="1%",
                       recipes=[Recipe("graph", (parse_recipe("graph").steps)), parse_recipe("@openvino")],
                       engines=("onnxruntime", "openvino"), time_budget_s=120, report_dir=tmp_path / "report",
                       progress=False)
    engines = {c.recipe.engine: c for c in outcome.result.candidates}
    assert set(engines) == {"onnxruntime", "openvino"} and all(c.error is None for c in engines.values())
    assert engines["openvino"].drop <= 0.01  # same model, same answers
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {row["engine"] for row in report["candidates"]} == {"onnxruntime", "openvino"}
    assert "| openvino |" in (tmp_path / "report" / "report.md").read_text()
    if outcome.ref is not None:
        artifact = cnn_repo.get("cnn", outcome.ref.version)
        assert artifact.manifest.default_runtime == outcome.result.chosen.recipe.engine
        assert artifact.manifest.metrics["engine"] == outcome.result.chosen.recipe.engine
        assert load_session(artifact).engine == outcome.result.chosen.recipe.engine


def test_an_engine_whose_outputs_differ_from_onnx_runtime_is_reported_and_never_chosen(cnn_repo, digits_data, noisy_engine):
    outcome = optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", max_drop="100%",
                       recipes=[parse_recipe("graph"), parse_recipe("graph@noisy")], engines=("onnxruntime", "noisy"),
                       time_budget_s=120, register=False, progress=False)
    noisy = next(c for c in outcome.result.candidates if c.recipe.engine == "noisy")
    assert noisy.error and "differ from ONNX Runtime's" in noisy.error and not noisy.within_budget
    assert outcome.result.chosen.recipe.engine == "onnxruntime"


def test_a_missing_engine_is_refused_before_the_search_naming_the_extra(cnn_repo, digits_data, monkeypatch):
    monkeypatch.setitem(ENGINES, "absent", ("leanserve_no_such_module", "absent"))
    with pytest.raises(UnsupportedFormat, match=r"pip install 'leanserve\[absent\]'"):
        optimize(cnn_repo, "cnn", eval_path=digits_data / "eval.npz", engines=("onnxruntime", "absent"), progress=False)


def test_optimize_command_takes_an_engine_list(capsys, cnn_repo, digits_data, tmp_path):
    code = main(["optimize", "cnn", "--repo", str(cnn_repo.root), "--eval", str(digits_data / "eval.npz"),
                 "--engines", "ort,bogus", "--dry-run"])
    assert code != 0 and "unknown engine 'bogus'" in capsys.readouterr().err


def test_a_float_winner_carries_a_tensorrt_calibration_table_and_an_int8_one_does_not(digits_cnn_onnx, digits, tmp_path):
    from leanserve.formats import read_model
    from leanserve.optimize.quantize import TRT_CALIBRATION_TABLE
    from leanserve.optimize.run import _trt_calibration
    from leanserve.optimize.search import Budget, Candidate, SearchResult

    calib = {"image": digits[0][:64]}
    signature = read_model(digits_cnn_onnx).signature
    for recipe, expected in [("graph:level=extended", [TRT_CALIBRATION_TABLE]), ("static_int8", [])]:
        chosen = Candidate(parse_recipe(recipe), path=digits_cnn_onnx)
        result = SearchResult(chosen, [], chosen, "top1", Budget(0.01), 0.0)
        files = _trt_calibration(result, signature, calib, tmp_path / recipe)
        assert [f.name for f in files][:1] == expected, recipe
