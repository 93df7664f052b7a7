"""Labelled feedback for fitting a mitigation: the predictions one version served, their delayed labels
and each request's group, read from the prediction log, and the check that every group has enough."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.errors import InvalidInput


@dataclass(frozen=True)
class Feedback:
    """Labelled predictions of one version: first row of each logged request."""

    inputs: dict[str, np.ndarray]
    scores: np.ndarray  # [N, 2] class scores the version served
    labels: np.ndarray  # [N] 0/1
    groups: np.ndarray  # [N] str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Feedback:
        return Feedback({k: v[index] for k, v in self.inputs.items()}, self.scores[index], self.labels[index], self.groups[index])



def read_feedback(db: Path, model: str, version: int, limit: int = 100_000) -> Feedback:
    """The labelled predictions of one version from the prediction log at ``db``. Raises InvalidInput
    when there is no log or no usable feedback."""
    from leanserve.monitor.store import LogConfig, PredictionLog, log_exists

    if not log_exists(Path(db)):
        raise InvalidInput(f"no prediction log at {db}: serve the model with monitoring on and send labels to "
                           f"POST /v2/models/{model}/feedback (or give --db)")
    log = PredictionLog(LogConfig(Path(db)), read_only=True)
    try:
        rows = log.rows(model, version, limit=limit, labelled=True)
    finally:
        log.close()
    return feedback_from_rows(rows, model, version)


def feedback_from_rows(rows: Sequence[dict[str, Any]], model: str, version: int) -> Feedback:
    """Rows with a group, a 0/1 label and two class scores, as arrays (first row of each request)."""
    kept = []
    for row in rows:
        label = np.asarray(row["label"]).reshape(-1)
        scores = np.asarray(next(iter(row["outputs"].values())))
        if (row.get("group") is not None and label.size and np.issubdtype(label.dtype, np.integer)
                and label[0] in (0, 1) and scores.ndim >= 1 and scores.shape[-1] == 2):
            kept.append(row)
    if not kept:
        raise InvalidInput(f"too little feedback to fit a mitigation: version {version} of model {model!r} has no "
                           f"labelled prediction with a group and a 0/1 label (of {len(rows)} labelled); send the "
                           "group as request parameter 'group' and labels to the feedback endpoint")
    inputs = {name: np.stack([np.asarray(r["inputs"][name])[0] for r in kept]) for name in kept[0]["inputs"]}
    scores = np.stack([np.asarray(next(iter(r["outputs"].values()))).reshape(-1, 2)[0] for r in kept])
    labels = np.array([int(np.asarray(r["label"]).reshape(-1)[0]) for r in kept], dtype=np.int64)
    return Feedback(inputs, scores, labels, np.array([str(r["group"]) for r in kept]))


def check_enough(data: Feedback, min_per_group: int) -> None:
    """Raise InvalidInput naming each group with too few labelled predictions, or without both labels."""
    names, counts = np.unique(data.groups, return_counts=True)
    names = [str(n) for n in names]
    if len(names) < 2:
        raise InvalidInput(f"too little feedback to fit a mitigation: labelled predictions from only "
                           f"{len(names)} group ({', '.join(map(repr, names))}); fairness needs at least two groups")
    problems = []
    for name, n in zip(names, counts):
        mine = data.labels[data.groups == name]
        if n < min_per_group:
            problems.append(f"group {name!r} has {n} labelled predictions (needs {min_per_group})")
        elif mine.min() == mine.max():
            problems.append(f"group {name!r} has only label {mine[0]} (needs both 0 and 1)")
    if problems:
        raise InvalidInput("too little feedback to fit a mitigation: " + "; ".join(problems))
