"""Which input and output of a signature an explanation covers: one floating-point input (features,
pixels, embeddings), or integer token ids with their companions (``attention_mask``, ``token_type_ids``),
and one floating-point output. Checked before inference, so what cannot be explained is a 400 that says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanserve.artifact import Signature, TensorSpec
from leanserve.errors import InvalidInput
from leanserve.explain.methods import COLUMN, SIMILARITY, ExplanationUnavailable

FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
TOKEN_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"


@dataclass(frozen=True)
class TokenInputs:
    """The inputs of a token model: ``ids`` (explained), ``attention_mask`` (when the model has one; hidden
    tokens may be dropped from it) and the others, passed through unchanged (``token_type_ids``)."""

    ids: str
    attention_mask: str | None
    others: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """What is explained: input ``input`` (attributions take its shape) for output ``output``; ``tokens``
    when the input holds token ids."""

    input: TensorSpec
    output: TensorSpec
    output_index: int  # position of ``output`` among the signature's outputs (for PyTorch sources)
    tokens: TokenInputs | None = None


def explain_target(signature: Signature, output: str | None = None, score: str = COLUMN,
                   text: TokenInputs | None = None) -> Target:
    """The input and output an explanation of this signature covers.

    Explainable inputs: one floating-point input, or integer token ids ``[batch, sequence]`` with integer
    companions of the same shape, or (``text``: the token inputs a text pipeline's tokenizer makes) one
    BYTES text input, explained per token; all with a variable leading batch axis. Explainable outputs: floating
    point, ``[batch]`` or ``[batch, classes]`` for the ``column`` score, any shape with several values per
    row for ``similarity``; ``output`` names it (default: the first floating-point output). Raises
    ExplanationUnavailable saying which condition fails, InvalidInput for an unknown output.
    """
    floats = [s for s in signature.inputs if s.datatype in FLOAT_TYPES]
    if text is not None and len(signature.inputs) == 1 and signature.inputs[0].datatype == "BYTES":
        spec, tokens = signature.inputs[0], text
    elif len(signature.inputs) == 1 and floats:
        spec, tokens = floats[0], None
    elif not floats and any(s.datatype in INTEGER_TYPES for s in signature.inputs):
        tokens = token_inputs(signature)
        spec = next(s for s in signature.inputs if s.name == tokens.ids)
    else:
        raise ExplanationUnavailable(f"{_unexplainable(signature)}: attributions need one floating-point input "
                                     "(features, pixels, embeddings) or integer token ids with their attention_mask "
                                     "and token_type_ids; strings cannot be masked unless the version's pipeline tokenizes them")
    for s in signature.inputs:
        if not s.shape or s.shape[0] != -1:
            raise ExplanationUnavailable(f"input {s.name!r} has shape {list(s.shape)}: explanations need a variable "
                                         "leading batch axis, because the explainer runs many masked copies at once")
    index = _output_index(signature, output)
    out = signature.outputs[index]
    if out.datatype not in FLOAT_TYPES:
        raise ExplanationUnavailable(f"output {out.name!r} is {out.datatype}: explanations cover a floating-point "
                                     "output (scores, logits, embeddings); name one with explain_output")
    if score == COLUMN and len(out.shape) not in (1, 2):
        raise ExplanationUnavailable(f"output {out.name!r} has shape {list(out.shape)}: the column score covers outputs "
                                     "of shape [batch] or [batch, classes]; explain_score similarity explains any shape")
    if score == SIMILARITY and (len(out.shape) < 2 or all(d == 1 for d in out.shape[1:])):
        raise ExplanationUnavailable(f"output {out.name!r} has one value per row: explain_score similarity needs "
                                     "several (an embedding); use explain_score column")
    return Target(spec, out, index, tokens)


def token_inputs(signature: Signature) -> TokenInputs:
    """The token ids and companions of a model whose inputs are all integer ``[batch, sequence]`` tensors;
    the ids are ``input_ids``, or the only input. Raises ExplanationUnavailable naming the input at fault."""
    names = [s.name for s in signature.inputs]
    for s in signature.inputs:
        if s.datatype not in INTEGER_TYPES or len(s.shape) != 2:
            raise ExplanationUnavailable(
                f"input {s.name!r} ({s.datatype} {list(s.shape)}) is not token ids or their companions: token "
                "attributions need integer inputs of shape [batch, sequence] only")
    if TOKEN_IDS in names:
        ids = TOKEN_IDS
    elif len(names) == 1:
        ids = names[0]
    else:
        raise ExplanationUnavailable(f"cannot tell which of the inputs {', '.join(names)} holds the token ids: "
                                     f"token attributions look for an input named {TOKEN_IDS!r}")
    mask = ATTENTION_MASK if ATTENTION_MASK in names else None
    return TokenInputs(ids, mask, tuple(n for n in names if n not in (ids, mask)))


def _output_index(signature: Signature, output: str | None) -> int:
    names = [s.name for s in signature.outputs]
    if output is not None:
        if output not in names:
            raise InvalidInput(f"explain_output {output!r} is not an output of this model; outputs: {', '.join(names)}")
        return names.index(output)
    return next((i for i, s in enumerate(signature.outputs) if s.datatype in FLOAT_TYPES), 0)


def _unexplainable(signature: Signature) -> str:
    described = ", ".join(f"{s.name} {s.datatype}" for s in signature.inputs)
    return f"this model's input{'s' if len(signature.inputs) > 1 else ''} ({described}) cannot be explained"
