"""int8 MiniLM through the optimize recipes, judged on sentences nothing was tuned on: blockwise int8
(activations quantized per block) stays closer to fp32 than dynamic int8 (one scale per tensor)."""

from __future__ import annotations

import numpy as np
import onnx

import minilm_support
from minilm_support import HELD_OUT, cosines
from leanserve.optimize.pipeline import pipeline_target, register_pipeline
from leanserve.optimize.recipe import parse_recipe, apply_recipe
from leanserve.optimize.steps import PassContext
from leanserve.repository import Repository
from leanserve.runtime import load_session

MORE = ["Ticket prices went up again.", "Thanks, that helps a lot.",
        "Engineers replaced the bridge's cables without closing it to traffic."]


def _int8_embeddings(repo: Repository, recipe: str, tmp_path) -> tuple[np.ndarray, list[str]]:
    target = pipeline_target(repo.get("minilm"))
    out = tmp_path / f"{recipe}.onnx"
    apply_recipe(parse_recipe(recipe), target.model_path, out, PassContext(target.inner_signature, None))
    ref = register_pipeline(repo, "minilm", target, out)
    session = load_session(repo.get(ref.name, ref.version))
    try:
        texts = np.array(HELD_OUT + MORE, dtype=object)
        return session.run({"text": texts})["embedding"], [n.op_type for n in onnx.load(str(out)).graph.node]
    finally:
        session.close()


def test_blockwise_int8_is_closer_to_fp32_than_dynamic_int8(tmp_path):
    repo = Repository(minilm_support.repo())
    expected = minilm_support.encoder()(HELD_OUT + MORE)
    blockwise, ops = _int8_embeddings(repo, "transformer+blockwise_int8", tmp_path)
    assert ops.count("MatMulNBits") == 18 and ops.count("QAttention") == 6  # 3 MatMuls and 1 attention per layer
    dynamic, _ = _int8_embeddings(repo, "transformer+dynamic_int8", tmp_path)
    assert cosines(blockwise, expected).min() >= 0.99
    assert cosines(blockwise, expected).min() > cosines(dynamic, expected).min()


def test_blockwise_int8_keeps_attention_float_when_asked(tmp_path):
    repo = Repository(minilm_support.repo())
    embeddings, ops = _int8_embeddings(repo, "transformer+blockwise_int8:attention=false,block_size=64", tmp_path)
    assert "QAttention" not in ops and ops.count("Attention") == 6 and ops.count("MatMulNBits") == 18
    assert cosines(embeddings, minilm_support.encoder()(HELD_OUT + MORE)).min() >= 0.999
