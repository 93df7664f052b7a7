"""The learner: a process beside the server that turns labelled feedback into guarded canary versions.

Each poll reads the newly labelled rows of the serving version from the prediction log (issue 5's
store: request inputs joined with their delayed labels), lets an ``OnlineLearner`` predict and then learn
each one, and keeps the learner's and the serving version's accuracy over the same sliding window
(prequential). When the learner is better by ``margin`` over a full window, it is exported to ONNX, the
serving version's optimization recipe (e.g. int8) is applied again, and the result is registered with its
provenance and PyTorch source and started as a guarded canary; the rollout guard decides the rest.

It never slows serving: it runs in its own process and only reads the log. A learner that diverges, or
that has collapsed when it would register (``derived.collapse_reason``), records why in
``REPO/<model>/.learn-events.jsonl`` and stops without registering; feedback it cannot use (no PyTorch
source, labels that are not class indices) is reported once and skipped.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanserve.artifact import ModelArtifact, Provenance
from leanserve.derived import collapse_reason
from leanserve.errors import InvalidInput, UnsupportedFormat
from leanserve.learn.online import Diverged, OnlineConfig, OnlineLearner, Prequential
from leanserve.traffic import start_rollout
from leanserve.monitor.packing import stack
from leanserve.monitor.store import LogConfig, PredictionLog, log_exists
from leanserve.repository import Repository, VersionRef
from leanserve.traffic import primary as primary_of
from leanserve.torch_source import find_source, save_source

log = logging.getLogger(__name__)
EVENTS_FILE = ".learn-events.jsonl"


@dataclass(frozen=True)
class LearnerConfig:
    """When the learner registers: better than the serving version by ``margin`` (accuracy) over a full
    ``window`` of the same samples. It stops when it falls ``max_accuracy_drop`` below the serving version."""

    online: OnlineConfig = field(default_factory=OnlineConfig)
    window: int = 200
    margin: float = 0.02
    max_accuracy_drop: float = 0.3
    poll_interval_s: float = 5.0
    max_rows: int = 10_000  # newest labelled rows read per poll

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_rows < 1 or self.poll_interval_s <= 0:
            raise InvalidInput("window and max_rows must be >= 1 and poll_interval_s > 0")
        if not 0 <= self.margin < 1 or not 0 < self.max_accuracy_drop <= 1:
            raise InvalidInput(f"margin must be in [0, 1) and max_accuracy_drop in (0, 1], got {self.margin}, "
                               f"{self.max_accuracy_drop}")


@dataclass(frozen=True)
class PollReport:
    """What one poll did: samples learnt, the window's accuracies, a version registered, or why not."""

    serving: VersionRef
    new_samples: int = 0
    samples_seen: int = 0
    accuracy: float | None = None
    serving_accuracy: float | None = None
    registered: VersionRef | None = None
    note: str = ""
    refused: bool = False  # the serving version's feedback cannot be used at all (the note says why)


@dataclass
class _Session:
    """The learner's state for one serving version."""

    learner: OnlineLearner
    prequential: Prequential
    input_names: tuple[str, ...]
    classes: int
    seen: set[str] = field(default_factory=set)
    since_registered: int = 0
    last_request_id: str = ""


class Learner:
    """Learns model ``name`` of ``repo`` from the labelled rows in the prediction log at ``log_path``."""

    def __init__(self, repo: Repository, name: str, log_path: str | Path, config: LearnerConfig = LearnerConfig()) -> None:
        log_path = Path(log_path)
        if not log_exists(log_path):
            raise InvalidInput(f"no prediction log at {log_path}: serve the model with monitoring on (the default) "
                               "and send feedback labels first, or pass --db")
        repo.versions(name)  # ModelNotFound for an unknown model
        self.repo, self.name, self.config = repo, name, config
        self._log = PredictionLog(LogConfig(log_path), read_only=True)  # the server's own writer does the writing
        self._session: _Session | None = None
        self._version: int | None = None
        self._refused: dict[int, str] = {}  # serving version -> why its feedback cannot be used
        self._reported: set[str] = set()  # problems already reported, not to be repeated every poll

    def close(self) -> None:
        self._log.close()

    # --- the loop -----------------------------------------------------------------------------------

    def run(self, once: bool = False, stop: threading.Event | None = None, report=print) -> list[PollReport]:
        """Poll until ``stop`` is set (or once); ``report`` gets each poll's report. Raises Diverged."""
        stop = stop or threading.Event()
        reports = []
        while True:
            reports.append(self.poll())
            report(reports[-1])
            if once or stop.wait(self.config.poll_interval_s):
                return reports

    def poll(self) -> PollReport:
        """Learn from the serving version's newly labelled rows; register a canary when the learner is better."""
        serving = self._serving_version()
        if serving.version != self._version:
            self._session, self._version = None, serving.version
        if serving.version in self._refused:
            return PollReport(serving, note=self._refused[serving.version], refused=True)
        rows = self._log.rows(self.name, serving.version, limit=self.config.max_rows, labelled=True)
        session = self._session
        fresh = [r for r in rows if session is None or r["request_id"] not in session.seen]
        if not fresh:
            return PollReport(serving, note="no new labelled samples")
        if session is None:
            try:
                session = self._session = self._start(serving, fresh[0])
            except (UnsupportedFormat, InvalidInput) as exc:
                return PollReport(serving, note=self._refuse(serving, str(exc)), refused=True)
        learnt, unusable = self._learn(session, fresh)
        note = ""
        if unusable:
            note = self._refuse_rows(serving, unusable, len(fresh), session.classes)
        pq = session.prequential
        report = PollReport(serving, learnt, session.learner.samples_seen, pq.accuracy, pq.serving_accuracy, note=note)
        why_not = self._why_not_register(session)
        if why_not:
            return replace(report, note="; ".join(filter(None, [note, why_not])))
        self._refuse_collapse(session, fresh)
        return replace(report, registered=self._register(serving, session, fresh))

    # --- learning -----------------------------------------------------------------------------------

    def _start(self, serving: VersionRef, first_row: dict[str, Any]) -> _Session:
        artifact = self.repo.get(serving.name, serving.version)
        module = find_source(self.repo, artifact)  # a fresh copy, loaded from disk
        names = artifact.signature.input_names
        example = _tensors(first_row["inputs"], names)
        with torch.no_grad():
            classes = int(_first(module(*example)).shape[-1])
        learner = OnlineLearner(module, example, self.config.online)
        self._record("start", f"learning {serving} with {self.config.online.algorithm}")
        return _Session(learner, Prequential(self.config.window), tuple(names), classes)

    def _learn(self, session: _Session, rows: Sequence[dict[str, Any]]) -> tuple[int, list]:
        learnt, unusable = 0, []
        for row in rows:
            session.seen.add(row["request_id"])
            label = _class_label(row["label"], session.classes)
            if label is None:
                unusable.append(row["label"])
                continue
            served = int(np.asarray(next(iter(row["outputs"].values()))).reshape(-1, session.classes)[0].argmax())
            try:
                correct = session.learner.learn_one(_tensors(row["inputs"], session.input_names), label)
            except Diverged as exc:
                self._stop(str(exc))
            session.prequential.record(correct, served == label)
            collapse = session.prequential.collapse(self.config.max_accuracy_drop)
            if collapse:
                self._stop(f"{collapse} after {session.learner.samples_seen} samples; the learner stopped and "
                           "registers nothing")
            learnt += 1
            session.since_registered += 1
            session.last_request_id = row["request_id"]
        return learnt, unusable

    def _stop(self, reason: str) -> None:
        self._record("diverged", reason)
        log.error("learner of %s: %s", self.name, reason)
        raise Diverged(f"learner of {self.name}: {reason}")

    # --- registering --------------------------------------------------------------------------------

    def _why_not_register(self, session: _Session) -> str:
        pq, cfg = session.prequential, self.config
        if not pq.full:
            return f"window filling ({len(session.seen)} of {cfg.window} samples)"
        if pq.accuracy - pq.serving_accuracy < cfg.margin:
            return (f"not better by {cfg.margin:.0%}: {pq.accuracy:.1%} against {pq.serving_accuracy:.1%} for the "
                    f"serving version over the last {cfg.window} samples")
        if session.since_registered < cfg.window:
            return f"registered a version {session.since_registered} samples ago; waiting for a full new window"
        rollout = self.repo.config(self.name).rollout
        if rollout.active:
            return f"canary {rollout.canary} is still being rolled out; not registering another"
        if self._already_registered(session.last_request_id):
            return "a version learnt from the same feedback is already registered"
        return ""

    def _refuse_collapse(self, session: _Session, rows: Sequence[dict[str, Any]]) -> None:
        """Stop (Diverged, recorded) rather than register a collapsed learner: non-finite weights, one class for
        the window's rows, or a window accuracy (each sample predicted before it was learnt) at or below chance."""
        module, pq = session.learner.module, session.prequential
        recent = [r for r in rows if _class_label(r["label"], session.classes) is not None][-pq.window:]
        with torch.no_grad():
            module.eval()
            batch = [torch.cat(p) for p in zip(*(_tensors(r["inputs"], session.input_names) for r in recent))]
            predictions = _first(module(*batch)).argmax(-1).numpy() if recent else None
            module.train()
        reason = collapse_reason(held_out_accuracy=pq.accuracy, classes=session.classes, predictions=predictions,
                                 weights=module.state_dict().values())
        if reason:
            self._stop(f"the learnt model collapsed after {session.learner.samples_seen} samples: {reason} (window "
                       f"accuracy {pq.accuracy:.1%}, serving {pq.serving_accuracy:.1%}); it stopped and registers nothing")

    def _already_registered(self, last_request_id: str) -> bool:
        for version in self.repo.versions(self.name):
            recipe = self.repo.get(self.name, version, verify=False).manifest.provenance.recipe or {}
            if recipe.get("learning", {}).get("last_request_id") == last_request_id:
                return True
        return False

    def _register(self, serving: VersionRef, session: _Session, rows: Sequence[dict[str, Any]]) -> VersionRef:
        from leanserve.from_torch import export

        artifact = self.repo.get(serving.name, serving.version)
        signature = artifact.signature
        parent_recipe = dict(artifact.manifest.provenance.recipe or {})
        parent_recipe.pop("learning", None)
        module, pq = session.learner.module.eval(), session.prequential
        example = tuple(torch.cat(parts) for parts in zip(*(_tensors(r["inputs"], session.input_names) for r in rows[-2:])))
        learning = {"algorithm": session.learner.config.algorithm, "parent": str(serving),
                    "samples_seen": session.learner.samples_seen, "window": pq.window,
                    "window_accuracy": round(pq.accuracy, 4), "serving_window_accuracy": round(pq.serving_accuracy, 4),
                    "last_request_id": session.last_request_id}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                result = export(module, example, Path(tmp) / "model.onnx", input_names=signature.input_names,
                                output_names=signature.output_names, exporter="torchscript")
                model_file = _reapply_recipe(parent_recipe, result.path, signature, rows, session.input_names)
                source = save_source(module, example, tmp)
                ref = self.repo.add(
                    model_file, self.name, attachments=[source], serve=False,  # the canary below serves it
                    runtime=parent_recipe.get("engine") if parent_recipe.get("steps") else None,
                    provenance=Provenance(source=f"leanserve learn {serving} --online --algorithm {learning['algorithm']}",
                                          parent=str(serving), exporter=result.exporter,
                                          recipe={"name": "online learning", "steps": [], **parent_recipe, "learning": learning}),
                    metrics={"window_accuracy": learning["window_accuracy"], "samples_seen": learning["samples_seen"]},
                )
        finally:
            module.train()
        start_rollout(self.repo, self.name, ref.version)
        session.since_registered = 0
        self._record("registered", f"{ref} learnt from {learning['samples_seen']} samples of {serving} "
                                   f"({pq.accuracy:.1%} against {pq.serving_accuracy:.1%} over {pq.window}); canary started")
        return ref

    # --- refusals and records -----------------------------------------------------------------------

    def _refuse(self, serving: VersionRef, reason: str) -> str:
        self._refused[serving.version] = reason
        self._record("refused", reason, once=True)
        log.warning("learner of %s: %s", self.name, reason)
        return reason

    def _refuse_rows(self, serving: VersionRef, labels: list, total: int, classes: int) -> str:
        prefix = f"labels of {serving} that are not class indices 0..{classes - 1} are skipped"
        if prefix in self._reported or self._recorded("skipped", prefix):
            return ""  # reported once (by this learner or an earlier run); such rows are skipped quietly
        self._reported.add(prefix)
        reason = f"{prefix} (got e.g. {np.asarray(labels[0]).tolist()!r}; {len(labels)} of {total} in this read)"
        self._record("skipped", reason)
        log.warning("learner of %s: %s", self.name, reason)
        return reason

    def _recorded(self, action: str, reason_start: str) -> bool:
        return any(e["action"] == action and e["reason"].startswith(reason_start)
                   for e in read_learn_events(self.repo, self.name, limit=1000))

    def _record(self, action: str, reason: str, once: bool = False) -> None:
        path = self.repo.root / self.name / EVENTS_FILE
        if once and self._recorded(action, reason):
            return
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"ts": round(time.time(), 3), "action": action, "reason": reason}) + "\n")

    def _serving_version(self) -> VersionRef:
        weights = self.repo.config(self.name).traffic.weights
        version = primary_of(weights)
        return self.repo.resolve(self.name, version)


def read_learn_events(repo: Repository, name: str, limit: int = 50) -> list[dict]:
    """The learner's records for a model (start, registered, refused, skipped, diverged), oldest first."""
    path = repo.root / name / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[-limit:] if line.strip()]


def _reapply_recipe(recipe: dict[str, Any], onnx_path: Path, signature, rows, input_names) -> Path:
    """The serving version's optimization passes applied to the learnt model, calibrated on the logged inputs."""
    if not recipe.get("steps"):
        return onnx_path
    from leanserve.optimize.recipe import Recipe, Step, apply_recipe
    from leanserve.optimize.steps import PassContext

    parsed = Recipe(recipe.get("name", "recipe"), tuple(Step(s["op"], s.get("params", {})) for s in recipe["steps"]),
                    recipe.get("engine", "onnxruntime"))
    calibration = {name: np.asarray(a, dtype=np.float32) if a.dtype.kind == "f" else a
                   for name, a in stack(rows, "inputs").items() if name in input_names}
    out = onnx_path.parent / "optimized" / "model.onnx"
    out.parent.mkdir()
    apply_recipe(parsed, onnx_path, out, PassContext(signature, calibration, exclude_nodes=tuple(recipe.get("kept_float", ()))))
    return out


def _class_label(label: Any, classes: int) -> int | None:
    """The label as a class index, or None when it is not one (a fraction, out of range, several values)."""
    value = np.asarray(label)
    if value.size != 1 or value.dtype.kind not in "iuf":
        return None
    number = value.reshape(-1)[0]
    if value.dtype.kind == "f" and (not np.isfinite(number) or number != np.floor(number)):
        return None
    return int(number) if 0 <= number < classes else None


def _tensors(inputs: dict[str, np.ndarray], names: Sequence[str]) -> tuple:
    # One labelled sample: the request's first row (a label is one value per request).
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[n][:1])) for n in names)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output
