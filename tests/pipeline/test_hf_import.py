"""`leanserve import` of Hugging Face classifier folders (small random models saved here, offline): the task
is detected, the pipeline attached, and the import checks itself against transformers' own pipelines."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
import minilm_support  # noqa: E402

from leanserve.cli import main  # noqa: E402
from leanserve.hf_import import detect_task  # noqa: E402
from leanserve.repository import Repository  # noqa: E402
from leanserve.runtime import load_session  # noqa: E402

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture
def text_classifier(tmp_path):
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, id2label=LABELS,
                                     label2id={v: k for k, v in LABELS.items()})
    folder = tmp_path / "sentiment"
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(minilm_support.folder() / name, folder / name)
    return folder


@pytest.fixture
def image_classifier(tmp_path):
    import torch

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, id2label=LABELS,
                                    label2id={v: k for k, v in LABELS.items()})
    folder = tmp_path / "pictures"
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def test_a_text_classifier_answers_labels_by_name(text_classifier, tmp_path, capsys):
    assert detect_task(text_classifier) == "text-classification"
    assert main(["import", str(text_classifier), "--name", "sentiment", "--repo", str(tmp_path / "repo")]) == 0
    assert "checked against the library: check_max_abs_diff" in capsys.readouterr().out
    session = load_session(Repository(tmp_path / "repo").get("sentiment"))
    got = session.run({"text": np.array([b"I loved it", b"Terrible service, never again"], dtype=object)})
    assert set(got["label"]) <= set(LABELS.values()) and got["top_labels"].shape == (2, 3)
    assert sorted(got["top_labels"][0]) == sorted(LABELS.values())
    classify = transformers.pipeline("text-classification", model=str(text_classifier), device="cpu")
    assert got["label"].tolist() == [d["label"] for d in classify(["I loved it", "Terrible service, never again"])]


def test_an_image_classifier_is_imported_with_its_preprocessing(image_classifier, tmp_path):
    from PIL import Image

    assert detect_task(image_classifier) == "image-classification"
    assert main(["import", str(image_classifier), "--name", "pictures", "--repo", str(tmp_path / "repo")]) == 0
    artifact = Repository(tmp_path / "repo").get("pictures")
    assert artifact.manifest.metrics["check_max_abs_diff"] < 1e-3
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=95)
    got = load_session(artifact).run({"image": np.array([buffer.getvalue()], dtype=object)})
    classify = transformers.pipeline("image-classification", model=str(image_classifier), device="cpu", top_k=3)
    theirs = classify(Image.open(io.BytesIO(buffer.getvalue())))
    assert got["top_labels"][0].tolist() == [d["label"] for d in theirs]
    assert np.allclose(got["top_scores"][0], [d["score"] for d in theirs], atol=1e-3)


def test_a_folder_of_unknown_task_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert main(["import", str(tmp_path), "--name", "x", "--repo", str(tmp_path / "repo")]) != 0
    assert "cannot tell the task from config.json (architectures ['GPT2LMHeadModel'])" in capsys.readouterr().err
