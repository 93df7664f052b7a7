"""Explaining text: a pipeline version whose input is text is explained per token of its own tokenizer.

The texts are tokenized by the version's text stage (the same tokenizer that served them), the tokens are
hidden as any token model's are (``tokens.py``), and each masked copy runs the inner model and the
output stage, so the explained score is the user's (class probabilities, or the pooled embedding for
the similarity score). The answer carries each position's token as a string beside its attribution.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from leanserve.explain.methods import Attribution, Deadline
from leanserve.explain.settings import ExplainConfig, ExplainPlan
from leanserve.explain.shap_values import explain_tokens
from leanserve.explain.targets import ATTENTION_MASK, TOKEN_IDS, TokenInputs
from leanserve.explain.tokens import check_lengths, masking_name, token_rows

TOKENS_SUFFIX = "__tokens"  # the response output beside ``<input>__attribution``: the tokens as strings


def text_tokens(artifact) -> TokenInputs | None:
    """The token inputs of a text pipeline version's model (None for any other version). Raises
    ModelLoadError for an unreadable ``pipeline.json``."""
    if artifact.manifest.format != "pipeline":
        return None
    from leanserve.pipeline import PipelineSpec

    spec = PipelineSpec.read(artifact.model_path)
    if spec.pre.get("kind") != "text":
        return None
    from leanserve.pipeline.text import TextSpec

    names = TextSpec.from_dict(spec.pre).inputs
    mask = ATTENTION_MASK if ATTENTION_MASK in names else None
    return TokenInputs(TOKEN_IDS, mask, tuple(n for n in names if n not in (TOKEN_IDS, mask)))


def explain_text(session, plan: ExplainPlan, texts: np.ndarray, deadline: Deadline, config: ExplainConfig) -> Attribution:
    """Per-token attributions of the BYTES ``texts`` on a pipeline ``session`` (``runtime.pipeline``):
    ``(rows, longest)`` values and the tokens they belong to. Raises InvalidInput for undecodable text,
    SequenceTooLong above ``config.max_tokens``, ExplanationTimeout when ``deadline`` passes."""
    stage, name = session.text, plan.target.input.name
    decoded = stage.texts(name, np.asarray(texts))
    encoded = stage.encode(decoded)
    check_lengths(encoded.tensors, plan.target.tokens, config.max_tokens)
    inner, output = session.inner, plan.target.output.name
    model_output = inner.signature.output_names[0]

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        # the output stage sees the masked attention mask too: a hidden token leaves the mean pool
        return session.post(inner.run(batch, [model_output])[model_output], batch.get(ATTENTION_MASK))[output]

    rows = token_rows(encoded.tensors, plan.target.tokens, plan.mask_id)
    result = explain_tokens(plan.method, predict, rows, deadline, target=plan.column, score=plan.score,
                            max_evals=config.shap_max_evals, permutations=plan.permutations)
    return replace(result, background=masking_name(plan.mask_id),
                   tokens=_token_strings(stage.tokens(decoded), encoded.tensors[TOKEN_IDS].shape))


def _token_strings(tokens: list[list[dict]], shape: tuple[int, int]) -> np.ndarray:
    """The tokens of each text at their positions in the padded batch (the tokenizer pads on the right);
    "" where the batch is padded."""
    strings = np.full(shape, "", dtype=object)
    for row, row_tokens in enumerate(tokens):
        strings[row, :len(row_tokens)] = [t["text"] for t in row_tokens]
    return strings
