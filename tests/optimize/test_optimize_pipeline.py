"""`optimize` on a text pipeline version: candidates are judged on texts through the version's own
stages, static int8 calibrates on the tokens the tokenizer makes, and a registered variant carries its
parent's pipeline (the same pipeline.json and tokenizer, checksummed)."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.optimize.pipeline import pipeline_target, register_pipeline, stage_inputs
from leanserve.optimize.recipe import Recipe, Step, apply_recipe
from leanserve.optimize.run import optimize
from leanserve.optimize.steps import PassContext
from leanserve.repository import Repository
from leanserve.runtime import load_session
from text_support import make_text_pipeline, sentences

pytest.importorskip("tokenizers")


@pytest.fixture
def text_repo(tmp_path):
    repo = Repository(tmp_path / "repo")
    repo.add(make_text_pipeline(tmp_path / "reviews", "classify"), "reviews")
    repo.add(make_text_pipeline(tmp_path / "encoder", "embed"), "encoder")
    return repo


@pytest.fixture
def reviews_npz(tmp_path):
    texts, labels = sentences(160, seed=5)
    np.savez(tmp_path / "reviews.npz", text=np.array(texts), labels=labels)
    return tmp_path / "reviews.npz"


INT8 = [Recipe("dynamic int8", (Step("dynamic_int8"),)), Recipe("static int8 (minmax)", (Step("static_int8", {"method": "minmax"}),))]


def test_int8_candidates_are_judged_on_texts_against_their_labels(text_repo, reviews_npz):
    outcome = optimize(text_repo, "reviews", eval_path=reviews_npz, recipes=INT8, time_budget_s=120, progress=False,
                       register=False)
    result = outcome.result
    assert result.metric == "top1" and result.baseline.measurement.quality == 1.0  # labels of the texts
    by_name = {c.recipe.name: c for c in result.candidates}
    for name in ("dynamic int8", "static int8 (minmax)"):  # static int8 calibrated on the tokenized texts
        assert by_name[name].error is None, by_name[name].error
        assert 0.9 <= by_name[name].measurement.quality <= 1.0 and by_name[name].holdout_quality is not None


def test_an_encoder_without_labels_is_judged_by_the_cosine_of_its_embeddings(text_repo, tmp_path):
    texts, _ = sentences(80, seed=6)
    np.savez(tmp_path / "texts.npz", text=np.array(texts))
    outcome = optimize(text_repo, "encoder", eval_path=tmp_path / "texts.npz", recipes=INT8[:1], time_budget_s=120,
                       progress=False, register=False)
    assert outcome.result.metric == "cosine" and outcome.result.baseline.measurement.quality == pytest.approx(1.0)
    assert outcome.result.candidates[0].measurement.quality > 0.99


def test_a_registered_variant_carries_its_parents_pipeline(text_repo, reviews_npz, tmp_path):
    outcome = optimize(text_repo, "reviews", eval_path=reviews_npz, recipes=INT8[:1], time_budget_s=120, progress=False)
    parent = text_repo.get("reviews", 1)
    target = pipeline_target(parent)
    # whether optimize registered one depends on speed on this machine; register the int8 model as it would
    int8 = tmp_path / "int8.onnx"
    apply_recipe(INT8[0], target.model_path, int8, PassContext(target.inner_signature, None))
    refs = [outcome.ref] if outcome.ref is not None else []
    refs.append(register_pipeline(text_repo, "reviews", target, int8))
    texts, labels = sentences(40, seed=7)
    for ref in refs:
        variant = text_repo.get(ref.name, ref.version)
        assert variant.manifest.format == "pipeline"
        assert set(parent.manifest.files) <= set(variant.manifest.files)
        for name in ("pipeline.json", "tokenizer.json"):
            assert variant.manifest.files[name] == parent.manifest.files[name]
        assert variant.manifest.files["model.onnx"] != parent.manifest.files["model.onnx"]
        assert variant.signature == parent.signature
        answer = load_session(variant).run({"text": np.array(texts, dtype=object)})
        assert (answer["probabilities"].argmax(axis=1) == labels).mean() >= 0.9


def test_stage_inputs_are_the_tokens_the_server_would_feed(text_repo):
    target = pipeline_target(text_repo.get("reviews"))
    tensors = stage_inputs(target, {"text": np.array(["the food was great", "slow"])})
    assert tensors["input_ids"].shape == (2, 6) and tensors["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]
