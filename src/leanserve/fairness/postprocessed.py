"""Post-processed engine: a base model plus a per-group decision rule, the served form of a fairness mitigation.

A post-processed version holds the base model's files and ``postprocess.json``: the request parameter
that names each request's group, the groups known when the rule was fitted, and per group a randomized
threshold rule on the base model's positive score (``score = s[:, 1] - s[:, 0]`` of its two class
scores). The session runs the base model with its own engine and replaces the class scores by the
rule's decision (one-hot), adding ``positive_probability``, the chance the rule decides for class 1.

The randomization is drawn from a hash of each row's inputs, not from a random generator: the same
request always gets the same answer (the response cache and replays stay right), while across many
requests each group's decisions follow the fitted probabilities.

The group reaches the session as the ``group_index`` input (INT64 [-1]); the data plane fills it from
the request parameter with ``request_inputs`` before batching, so a missing parameter or a group never
seen in fitting is one request's 400, never a failed batch.

The module knows nothing of files or other engines: the runtime loads the base model (``inner_artifact``)
with its own engine and hands the session to ``wrap``; ``formats`` reads a version's signature with
``PostprocessSpec`` and ``signature_of``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import Manifest, ModelArtifact, Signature, TensorSpec
from leanserve.errors import InvalidInput, ModelLoadError

SPEC_KIND = "leanserve.postprocess/group-thresholds"
GROUP_INPUT = "group_index"
PROBABILITY_OUTPUT = "positive_probability"


@dataclass(frozen=True)
class Threshold:
    """``score > value`` (operator ``>``) or ``score < value`` (``<``); value may be +-inf."""

    operator: str
    value: float

    def __post_init__(self) -> None:
        if self.operator not in (">", "<"):
            raise InvalidInput(f"threshold operator must be '>' or '<', got {self.operator!r}")

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.value if self.operator == ">" else scores < self.value

    def to_dict(self) -> dict[str, Any]:
        value = self.value if math.isfinite(self.value) else ("inf" if self.value > 0 else "-inf")
        return {"operator": self.operator, "value": value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Threshold:
        return cls(str(data["operator"]), float(data["value"]))


@dataclass(frozen=True)
class GroupRule:
    """P(decide 1) = p0 * [op0(score)] + p1 * [op1(score)], then with probability ``p_ignore`` the
    constant ``constant`` instead: the shape of Fairlearn's interpolated thresholds."""

    p0: float
    op0: Threshold
    p1: float
    op1: Threshold
    p_ignore: float = 0.0
    constant: float = 0.0

    def positive_probability(self, scores: np.ndarray) -> np.ndarray:
        mixed = self.p0 * self.op0(scores) + self.p1 * self.op1(scores)
        return self.p_ignore * self.constant + (1.0 - self.p_ignore) * mixed

    def to_dict(self) -> dict[str, Any]:
        return {"p0": self.p0, "op0": self.op0.to_dict(), "p1": self.p1, "op1": self.op1.to_dict(),
                "p_ignore": self.p_ignore, "constant": self.constant}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupRule:
        return cls(float(data["p0"]), Threshold.from_dict(data["op0"]), float(data["p1"]),
                   Threshold.from_dict(data["op1"]), float(data.get("p_ignore", 0.0)), float(data.get("constant", 0.0)))


@dataclass(frozen=True)
class PostprocessSpec:
    """The contents of ``postprocess.json``."""

    base_model: str  # file name of the base model, beside the spec
    base_format: str
    group_parameter: str
    rules: Mapping[str, GroupRule]  # group -> rule; the order is the group index
    provenance: Mapping[str, Any] | None = None

    @property
    def groups(self) -> list[str]:
        return list(self.rules)

    def to_json(self) -> str:
        return json.dumps({"kind": SPEC_KIND, "base_model": self.base_model, "base_format": self.base_format,
                           "group_parameter": self.group_parameter,
                           "rules": {g: r.to_dict() for g, r in self.rules.items()},
                           "provenance": dict(self.provenance or {})}, indent=2)

    @classmethod
    def read(cls, path: Path) -> PostprocessSpec:
        """Parse a spec file; raise ModelLoadError naming what is wrong."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("kind") != SPEC_KIND:
                raise ValueError(f"'kind' must be {SPEC_KIND!r}")
            base = str(data["base_model"])
            if Path(base).name != base:
                raise ValueError("base_model must be a file name beside the spec, not a path")
            rules = {str(g): GroupRule.from_dict(r) for g, r in data["rules"].items()}
            if not rules:
                raise ValueError("no group rules")
            return cls(base, str(data["base_format"]), str(data["group_parameter"]), rules, data.get("provenance"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
            raise ModelLoadError(f"{Path(path).name}: not a post-processing spec ({exc})") from exc


def positive_score(scores: np.ndarray) -> np.ndarray:
    """The positive-class score of two class scores [N, 2] (logits or probabilities): s1 - s0, which
    orders rows as P(class 1) does. Raises InvalidInput for any other shape."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise InvalidInput(f"post-processing needs a binary classifier whose first output is two class scores "
                           f"[N, 2]; got shape {list(scores.shape)}")
    return scores[:, 1].astype(np.float64) - scores[:, 0].astype(np.float64)


def signature_of(base: Signature) -> Signature:
    """The post-processed signature: the base inputs plus ``group_index``, the base outputs plus
    ``positive_probability``. Raises InvalidInput when the base cannot be post-processed."""
    if not base.outputs or tuple(base.outputs[0].shape[1:]) != (2,):
        raise InvalidInput(f"post-processing needs a binary classifier whose first output is two class scores "
                           f"[-1, 2]; this model's first output is {base.outputs[0].describe() if base.outputs else 'missing'}")
    for name in (GROUP_INPUT, PROBABILITY_OUTPUT):
        if name in base.input_names or name in base.output_names:
            raise InvalidInput(f"the base model already has a tensor named {name!r}, which post-processing adds")
    return Signature((*base.inputs, TensorSpec(GROUP_INPUT, "INT64", (-1,))),
                     (*base.outputs, TensorSpec(PROBABILITY_OUTPUT, "FP32", (-1,))))


def row_uniforms(inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One number in [0, 1) per row, a hash of that row's inputs: the rule's reproducible coin."""
    rows = len(inputs[names[0]])
    draws = np.empty(rows)
    for i in range(rows):
        digest = hashlib.blake2b(digest_size=8)
        for name in names:
            row = inputs[name][i]
            digest.update(b"".join(np.ravel(row)) if row.dtype == object else np.ascontiguousarray(row).tobytes())
        draws[i] = int.from_bytes(digest.digest(), "little") / 2.0**64
    return draws


class PostprocessedSession:
    """The base model's session followed by the per-group rule. Its signature is the base's plus the
    ``group_index`` input and the ``positive_probability`` output (``signature_of``); raises InvalidInput
    when the base is not a binary classifier."""

    engine = "postprocessed"

    def __init__(self, base, spec: PostprocessSpec) -> None:
        self._base = base
        self.spec = spec
        self.signature = signature_of(base.signature)
        self._rules = list(spec.rules.values())
        self._index = {g: i for i, g in enumerate(spec.groups)}
        self._base_inputs = base.signature.input_names
        self._scores_name = base.signature.output_names[0]

    def request_inputs(self, parameters: Mapping[str, Any], rows: int) -> dict[str, np.ndarray]:
        """The ``group_index`` input of a request from its group parameter. Raises InvalidInput when the
        parameter is missing or names a group the rule was not fitted on."""
        name = self.spec.group_parameter
        if name not in parameters or parameters[name] is None:
            raise InvalidInput(f"this version post-processes by group: the request needs the parameter {name!r} "
                               f"(one of {', '.join(map(repr, self.spec.groups))})")
        group = str(parameters[name])
        if group not in self._index:
            raise InvalidInput(f"group {group!r} (parameter {name!r}) was never seen when this version's "
                               f"post-processing was fitted; known groups: {', '.join(map(repr, self.spec.groups))}")
        return {GROUP_INPUT: np.full(rows, self._index[group], dtype=np.int64)}

    def group_indices(self, groups: Sequence[str]) -> np.ndarray:
        """``group_index`` values of a column of group names (InvalidInput for an unknown group)."""
        unknown = sorted({str(g) for g in groups} - self._index.keys())
        if unknown:
            raise InvalidInput(f"groups never seen in fitting: {', '.join(map(repr, unknown))}; "
                               f"known groups: {', '.join(map(repr, self.spec.groups))}")
        return np.array([self._index[str(g)] for g in groups], dtype=np.int64)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        index = np.asarray(inputs[GROUP_INPUT]).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self._rules)):
            raise InvalidInput(f"{GROUP_INPUT} must lie in 0..{len(self._rules) - 1} (groups {self.spec.groups})")
        base_inputs = {name: inputs[name] for name in self._base_inputs}
        results = self._base.run(base_inputs)
        scores = results[self._scores_name]
        score = positive_score(scores)
        probability = np.zeros(len(score))
        for i, rule in enumerate(self._rules):
            mine = index == i
            if mine.any():
                probability[mine] = rule.positive_probability(score[mine])
        decision = row_uniforms(base_inputs, self._base_inputs) < probability
        one_hot = np.zeros_like(scores)
        one_hot[np.arange(len(decision)), decision.astype(np.int64)] = 1
        results[self._scores_name] = one_hot
        results[PROBABILITY_OUTPUT] = probability.astype(np.float32)
        return {name: results[name] for name in (outputs or self.signature.output_names)}

    def close(self) -> None:
        self._base.close()


def base_signature(signature: Signature) -> Signature:
    """The base model's signature inside a post-processed one: ``signature_of`` undone."""
    if signature.input_names[-1:] != [GROUP_INPUT] or signature.output_names[-1:] != [PROBABILITY_OUTPUT]:
        raise ModelLoadError(f"not a post-processed signature: it lacks {GROUP_INPUT!r} or {PROBABILITY_OUTPUT!r}")
    return Signature(tuple(signature.inputs[:-1]), tuple(signature.outputs[:-1]))


def inner_artifact(artifact: ModelArtifact) -> ModelArtifact:
    """The base model inside a post-processed version, as an artifact its own engine loads (checksums
    were verified with the version). Raises ModelLoadError for an unreadable spec."""
    spec = PostprocessSpec.read(artifact.model_path)
    manifest = Manifest(format=spec.base_format, model_file=spec.base_model,
                        signature=base_signature(artifact.signature), files={})
    return ModelArtifact(artifact.path, manifest)


def wrap(base, artifact: ModelArtifact) -> PostprocessedSession:
    """The version's session around ``base``, the session of its ``inner_artifact``. Raises ModelLoadError."""
    try:
        return PostprocessedSession(base, PostprocessSpec.read(artifact.model_path))
    except InvalidInput as exc:
        raise ModelLoadError(f"{artifact.model_path.name}: {exc}") from exc
