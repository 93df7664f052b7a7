"""Bias mitigation as a served version: Fairlearn's ``ThresholdOptimizer`` fitted on labelled feedback.

The served version's logged class scores, the delayed labels and each request's group (from the
prediction log) fit per-group randomized thresholds under a constraint (demographic parity or
equalized odds). The fitted rule becomes a new version: the base model's files plus
``postprocess.json`` (plain numbers, no pickle), served by the ``postprocessed`` engine, which reads
the group from a request parameter. The new version enters as a guarded canary.

The report compares the served decisions with the post-processed ones on held-out feedback, by
cross-fitting: the feedback is cut into ``folds``, each fold is decided by a rule fitted on the other
folds, and the figures pool every fold. Each row is thus judged by a rule that never saw it, and all
of a small feedback set counts. The registered rule is then fitted on all of it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.artifact import ModelArtifact, Provenance
from leanserve.derived import HeldOut, check_not_worse
from leanserve.errors import InvalidInput
from leanserve.fairness.feedback import Feedback, check_enough, read_feedback
from leanserve.fairness.metrics import FairnessReport, fairness_report
from leanserve.fairness.postprocessed import (
    GROUP_INPUT,
    GroupRule,
    PostprocessedSession,
    PostprocessSpec,
    Threshold,
    positive_score,
    signature_of,
)
from leanserve.repository import Repository

CONSTRAINTS = ("demographic_parity", "equalized_odds")
SPEC_FILE = "postprocess.json"
REPORT_FILE = "fairness-report.json"
GAP_OF = {"demographic_parity": "demographic_parity_difference", "equalized_odds": "equalized_odds_difference"}


@dataclass(frozen=True)
class MitigationReport:
    """What ``mitigate`` did and measured: held-out figures of the served and the mitigated decisions."""

    model: str
    base_version: int
    version: int | None
    constraint: str
    group_parameter: str
    fit_rows: int
    folds: int
    before: FairnessReport
    after: FairnessReport
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    canary: bool = False

    def gap_of(self, report: FairnessReport) -> float | None:
        """The gap the constraint targets, in ``report``."""
        return getattr(report, GAP_OF[self.constraint])

    @property
    def gap_before(self) -> float | None:
        return self.gap_of(self.before)

    @property
    def gap_after(self) -> float | None:
        return self.gap_of(self.after)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "base_version": self.base_version, "version": self.version,
                "constraint": self.constraint, "group_parameter": self.group_parameter, "fit_rows": self.fit_rows,
                "folds": self.folds, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "rules": self.rules, "canary": self.canary}

    def to_text(self) -> str:
        """A table of per-group rates and accuracy before and after, for the terminal."""
        lines = [f"model {self.model}: version {self.base_version} -> {self.version} ({self.constraint}, group from "
                 f"parameter {self.group_parameter!r}); fitted on {self.fit_rows} labelled predictions; "
                 f"figures held out by {self.folds}-fold cross-fitting",
                 f"{'group':<16}{'n':>6}  {'selection':>17}  {'TPR':>17}  {'FPR':>17}  {'accuracy':>17}"]
        after = {g.group: g for g in self.after.groups}
        for b in self.before.groups:
            a = after.get(b.group)
            cells = [_pair(getattr(b, k), getattr(a, k) if a else None)
                     for k in ("selection_rate", "true_positive_rate", "false_positive_rate", "accuracy")]
            lines.append(f"{b.group:<16}{b.samples:>6}  " + "  ".join(f"{c:>17}" for c in cells))
        lines.append(f"{'all':<16}{self.before.samples:>6}  {'':>17}  {'':>17}  {'':>17}  "
                     f"{_pair(self.before.accuracy, self.after.accuracy):>17}")
        for name, key in (("demographic parity difference", "demographic_parity_difference"),
                          ("equalized odds difference", "equalized_odds_difference")):
            lines.append(f"{name}: {_pair(getattr(self.before, key), getattr(self.after, key))}")
        if self.before.accuracy is not None and self.after.accuracy is not None:
            lines.append(f"accuracy cost: {self.before.accuracy - self.after.accuracy:+.4f}")
        if self.canary:
            lines.append(f"version {self.version} enters as a guarded canary; requests to it need the parameter "
                         f"{self.group_parameter!r}")
        return "\n".join(lines)


def _pair(before: float | None, after: float | None) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    return f"{fmt(before)} -> {fmt(after)}"


# --- fitting ----------------------------------------------------------------------------------------

def fit_optimizer(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, constraint: str):
    """Fairlearn's ThresholdOptimizer fitted (prefit, accuracy objective) on ``positive_score(scores)``."""
    from fairlearn.postprocessing import ThresholdOptimizer
    from sklearn.base import BaseEstimator

    class LoggedScores(BaseEstimator):
        """A prefit 'estimator' whose prediction is its input: the positive scores the version served,
        so the optimizer thresholds exactly what the served model produced."""

        def fit(self, X, y=None):  # noqa: N803 (scikit-learn's argument names)
            return self

        def predict(self, X):  # noqa: N803
            return np.asarray(X)[:, 0]

        def __sklearn_is_fitted__(self) -> bool:
            return True

    if constraint not in CONSTRAINTS:
        raise InvalidInput(f"unknown constraint {constraint!r}; expected one of {', '.join(CONSTRAINTS)}")
    optimizer = ThresholdOptimizer(estimator=LoggedScores(), constraints=constraint, objective="accuracy_score",
                                   prefit=True, predict_method="predict")
    return optimizer.fit(positive_score(scores)[:, None], labels, sensitive_features=groups)


def rules_from(optimizer) -> dict[str, GroupRule]:
    """The per-group rules of a fitted ThresholdOptimizer (its interpolated thresholds), by sorted group."""
    rules = {}
    for group, part in sorted(optimizer.interpolated_thresholder_.interpolation_dict.items()):
        rules[str(group)] = GroupRule(
            float(part.p0), Threshold(part.operation0.operator, float(part.operation0.threshold)),
            float(part.p1), Threshold(part.operation1.operator, float(part.operation1.threshold)),
            float(part.get("p_ignore", 0.0)), float(part.get("prediction_constant", 0.0)))
    return rules


def fit_rules(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, constraint: str) -> dict[str, GroupRule]:
    """Per-group rules from Fairlearn's ThresholdOptimizer fitted on the served scores."""
    return rules_from(fit_optimizer(scores, labels, groups, constraint))


def cross_fitted(session_for, data: Feedback, constraint: str, folds: int, seed: int) -> np.ndarray:
    """Held-out decisions for every row: each fold decided by a rule fitted on the other folds.
    ``session_for(rules)`` builds the post-processed session of a rule set."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise InvalidInput(f"folds must be at least 2, got {folds}")
    strata = np.char.add(data.groups.astype(str), data.labels.astype(str))
    decisions = np.zeros(len(data), dtype=np.int64)
    for fit_idx, held_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.labels, strata):
        fit_part = data.subset(fit_idx)
        rules = fit_rules(fit_part.scores, fit_part.labels, fit_part.groups, constraint)
        decisions[held_idx] = decide(session_for(rules), data.subset(held_idx))
    return decisions


def decide(session: PostprocessedSession, data: Feedback) -> np.ndarray:
    """The post-processed session's 0/1 decisions on logged inputs (the engine's own code path)."""
    inputs = {**data.inputs, GROUP_INPUT: session.group_indices(data.groups)}
    batched = all(s.shape and s.shape[0] == -1 for s in session.signature.inputs)
    if batched:
        scores = session.run(inputs)[session.signature.output_names[0]]
    else:
        scores = np.concatenate([session.run({k: v[i:i + 1] for k, v in inputs.items()})[session.signature.output_names[0]]
                                 for i in range(len(data))])
    return scores.argmax(axis=1)


# --- the new version --------------------------------------------------------------------------------

def write_version_folder(folder: Path, base: ModelArtifact, spec: PostprocessSpec) -> Path:
    """Copy the base model's files beside a new spec in ``folder``; returns the spec's path."""
    from leanserve.formats import read_model

    source = read_model(base.model_path)
    for file in (source.model_file, *source.extra_files):
        target = folder / Path(file).resolve().relative_to(base.path.resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    path = folder / SPEC_FILE
    path.write_text(spec.to_json(), encoding="utf-8")
    return path


def mitigate(repo: Repository, name: str, *, group_parameter: str = "group", constraint: str = "demographic_parity",
             db: Path | None = None, version: int | None = None, folds: int = 5, min_per_group: int = 30,
             seed: int = 0, canary: bool = True, feedback: Feedback | None = None,
             force: bool = False) -> MitigationReport:
    """Fit a mitigation on the labelled feedback of ``version`` (default: the primary, else the newest)
    and register it as the next version of ``name``, started as a guarded canary when ``canary``.
    The report's figures are held out by ``folds``-fold cross-fitting (see the module docstring).

    ``feedback`` replaces reading the prediction log at ``db`` (default ``REPO/.monitor/predictions.db``).
    A mitigation whose held-out gap (the one ``constraint`` targets) is not smaller than the served
    decisions' raises ``derived.WorseThanParent`` and registers nothing, unless ``force`` (then it is
    registered with a warning). Its accuracy cost is the trade it exists for, and is reported, not judged.

    Raises InvalidInput for an unknown constraint, a model that is not a binary classifier, or too
    little feedback (naming the groups short of it); ModelNotFound for an unknown model or version;
    WorseThanParent as above.
    """
    from leanserve.runtime import load_session
    from leanserve.traffic import primary

    if constraint not in CONSTRAINTS:
        raise InvalidInput(f"unknown constraint {constraint!r}; expected one of {', '.join(CONSTRAINTS)}")
    if not group_parameter:
        raise InvalidInput("the group parameter needs a name (e.g. --group-param group)")
    base_ref = repo.resolve(name, version if version is not None else primary(repo.config(name).traffic.weights))
    base = repo.get(name, base_ref.version)
    if base.manifest.format == "postprocessed":
        raise InvalidInput(f"version {base_ref.version} of {name!r} is already post-processed; mitigate its base version")
    signature_of(base.signature)  # InvalidInput now, before reading feedback, when the base is no binary classifier
    data = feedback or read_feedback(Path(db) if db else repo.root / ".monitor" / "predictions.db", name, base_ref.version)
    check_enough(data, min_per_group)
    provenance = {"constraint": constraint, "base_version": base_ref.version, "fit_rows": len(data)}
    base_session = load_session(base)
    try:
        def session_for(rules: dict[str, GroupRule]) -> PostprocessedSession:
            spec = PostprocessSpec(base.manifest.model_file, base.manifest.format, group_parameter, rules, provenance)
            return PostprocessedSession(base_session, spec)

        held_out = cross_fitted(session_for, data, constraint, folds, seed)
    finally:
        base_session.close()
    rules = fit_rules(data.scores, data.labels, data.groups, constraint)
    spec = PostprocessSpec(base.manifest.model_file, base.manifest.format, group_parameter, rules, provenance)
    before = fairness_report(data.labels, data.scores.argmax(axis=1), data.groups)
    after = fairness_report(data.labels, held_out, data.groups)
    report = MitigationReport(name, base_ref.version, None, constraint, group_parameter, len(data), folds,
                              before, after, {g: r.to_dict() for g, r in rules.items()})
    forced = check_not_worse(_gap_figure(report), force, f"the mitigation of {name}:{base_ref.version}")
    new_version = _register(repo, name, base, spec, report, forced)
    if canary:
        from leanserve.traffic import start_rollout

        start_rollout(repo, name, new_version)
    return MitigationReport(**{**report.__dict__, "version": new_version, "canary": canary})


def _gap_figure(report: MitigationReport) -> HeldOut | None:
    """The targeted gap of the mitigated decisions beside the served ones' (lower is better; no budget:
    a mitigation must shrink it); None when a gap could not be measured."""
    if report.gap_before is None or report.gap_after is None:
        return None
    return HeldOut(GAP_OF[report.constraint], report.gap_before, report.gap_after, None, higher_is_better=False)


def _register(repo: Repository, name: str, base: ModelArtifact, spec: PostprocessSpec, report: MitigationReport,
              forced: str | None = None) -> int:
    import fairlearn

    with tempfile.TemporaryDirectory(prefix="leanserve-mitigate-") as tmp:
        spec_path = write_version_folder(Path(tmp), base, spec)
        attachment = Path(tmp) / REPORT_FILE
        attachment.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        provenance = Provenance(source=str(base.model_path), parent=f"{name}:{spec.provenance['base_version']}",
                                recipe={"mitigation": "fairlearn.ThresholdOptimizer", "constraint": report.constraint,
                                        "group_parameter": spec.group_parameter, "fairlearn": fairlearn.__version__})
        metrics = {"fairness": {"constraint": report.constraint, "gap_before": report.gap_before,
                                "gap_after": report.gap_after, "accuracy_before": report.before.accuracy,
                                "accuracy_after": report.after.accuracy, "folds": report.folds}}
        if forced:
            metrics["registered_with_force"] = forced
        ref = repo.add(spec_path, name, provenance=provenance, metrics=metrics, attachments=[attachment],
                       serve=False)  # takes traffic through its canary (--canary) or promote
    return ref.version
