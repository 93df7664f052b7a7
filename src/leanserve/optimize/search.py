"""Accuracy-aware search: try recipes in order of expected gain, measure each on the same data, keep
sensitive layers in float when a candidate breaks the budget, and pick the fastest one within it.

The search chooses on its evaluation data (the *selection* part); ``grade_holdout`` then measures every
candidate's quality on rows the choice never saw (the *held-out* part), which is the figure to report."""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from leanserve.artifact import Signature
from leanserve.config import RuntimeOptions
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.holdout import SplitInfo
from leanserve.measure import (METRICS, Measurement, PeakMemory, Speed, file_size, measure_speed, outputs_mismatch,
                               quality_drop, run_all)
from leanserve.optimize import quantize
from leanserve.optimize.recipe import QUANTIZING, Recipe, apply_recipe
from leanserve.optimize.steps import PassContext
from leanserve.runtime import load_file, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """The largest quality drop allowed: absolute in the metric's units, or relative to the baseline."""

    value: float
    relative: bool = False

    def allowed(self, baseline: float) -> float:
        return abs(baseline) * self.value if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value:.2%} of baseline" if self.relative else f"{self.value:g}"


def parse_budget(text: str) -> Budget:
    """``0.5%`` = 0.005 in the metric's units (0.5 accuracy points); ``1%rel`` = 1% of the baseline; ``0.01`` as is."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%\s*rel|%)?\s*", text or "")
    if not match:
        raise InvalidInput(f"--max-accuracy-drop {text!r}: expected e.g. 0.5% (points), 1%rel (relative) or 0.01")
    value, unit = float(match.group(1)), (match.group(2) or "").replace(" ", "")
    return Budget(value / 100, relative=unit == "%rel") if unit else Budget(value)


@dataclass
class Candidate:
    """One variant: its recipe, file, measurement, quality drop and whether it is within budget."""

    recipe: Recipe
    path: Path | None = None
    measurement: Measurement | None = None
    drop: float | None = None
    within_budget: bool = False
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    kept_float: tuple[str, ...] = ()
    holdout_quality: float | None = None  # quality on the held-out part (``measurement.quality`` is the selection's)
    holdout_drop: float | None = None


@dataclass
class SearchResult:
    """The search's candidates and choice. ``holdout`` says how the evaluation data was split (None when
    the candidates were not graded on held-out rows); ``skipped`` names the recipes the time budget left
    untried."""

    baseline: Candidate
    candidates: list[Candidate]
    chosen: Candidate | None
    metric: str
    budget: Budget
    elapsed_s: float
    holdout: SplitInfo | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class Searcher:
    """Runs the search for one ONNX model; all candidates are written under ``workdir``."""

    model: Path
    signature: Signature
    eval_data: Mapping[str, np.ndarray]
    calibration: Mapping[str, np.ndarray] | None
    metric: str
    budget: Budget
    workdir: Path
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    batch_size: int = 32
    time_budget_s: float = 600.0
    speed_time_s: float = 1.0
    objective: str = "latency"
    progress: bool = True
    skip_speed: bool = False  # sensitivity trials need quality only
    reference: dict[str, np.ndarray] | None = None
    compile_share: float = 0.25  # share of the time left that one ahead-of-time compilation (TVM tuning) may use
    # puts each candidate's session inside the version's stages before it is measured (pipeline versions:
    # see optimize/pipeline.py); eval_data then holds the stages' input (texts), calibration the model's
    wrap: Callable | None = None
    _started: float = field(default_factory=time.perf_counter)
    _ort_outputs: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict)  # recipe steps -> ORT outputs

    def run(self, recipes: Sequence[Recipe], extra: Mapping[str, Path] | None = None) -> SearchResult:
        """Measure the original, then ``extra`` ready-made variants (e.g. pruned or distilled PyTorch
        exports, each with the same signature), then each recipe (with sensitivity fallback), until the
        time budget ends."""
        from tqdm import tqdm

        baseline = self.evaluate(Recipe("original"), self.model)
        if baseline.error:
            raise LeanserveError(f"the original model cannot be measured: {baseline.error}")
        baseline.within_budget = True
        candidates: list[Candidate] = []
        for name, path in (extra or {}).items():
            candidate = self.evaluate(Recipe(name), Path(path), baseline)
            candidate.notes.append("a ready-made variant (trained in PyTorch and exported)")
            candidates.append(candidate)
        bar = tqdm(recipes, desc="optimizing", unit="recipe", disable=not self.progress)
        skipped: list[str] = []
        for tried, recipe in enumerate(bar):
            if self.time_left() <= 0:
                skipped = [r.name for r in recipes[tried:]]
                log.warning("time budget spent; %d recipe(s) not tried: %s", len(skipped), ", ".join(skipped))
                break
            bar.set_postfix_str(recipe.name)
            candidate = self.try_recipe(recipe, baseline)
            candidates.append(candidate)
            if candidate.error is None and not candidate.within_budget and recipe.quantizes and self.time_left() > 0:
                rescued = self.keep_sensitive_in_float(recipe, baseline)
                candidates.extend(rescued)
        within = [c for c in [baseline, *candidates] if c.within_budget and c.measurement]
        chosen = min(within, key=self._cost) if within else None
        return SearchResult(baseline, candidates, chosen, self.metric, self.budget, time.perf_counter() - self._started,
                            skipped=skipped)

    def grade_holdout(self, result: SearchResult, holdout: Mapping[str, np.ndarray], info: SplitInfo) -> None:
        """Measure the quality of the baseline and of every measured candidate on ``holdout`` (rows the
        choice never saw), setting each one's ``holdout_quality`` and ``holdout_drop``; the choice stays.
        Candidates whose file cannot be run again keep None (their selection figure is still reported)."""
        base = self._quality_on(result.baseline, holdout, None)
        if base is None:
            raise LeanserveError("the original model cannot be measured on the held-out data")
        reference, result.baseline.holdout_quality = base
        result.baseline.holdout_drop = 0.0
        for candidate in result.candidates:
            if candidate.measurement is None or candidate.path is None:
                continue
            graded = self._quality_on(candidate, holdout, reference)
            if graded is not None:
                candidate.holdout_quality = graded[1]
                candidate.holdout_drop = quality_drop(self.metric, result.baseline.holdout_quality, graded[1])
        result.holdout = info

    def _quality_on(self, candidate: Candidate, data: Mapping[str, np.ndarray],
                    reference: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], float] | None:
        try:
            session = self._load(candidate.path, candidate.recipe)
        except (LeanserveError, RuntimeError, ValueError, OSError) as exc:
            log.warning("%s could not be loaded again for the held-out data: %s", candidate.recipe.name, exc)
            return None
        try:
            outputs = run_all(session, data, self.batch_size)
        except (LeanserveError, RuntimeError, ValueError) as exc:
            log.warning("%s failed on the held-out data: %s", candidate.recipe.name, exc)
            return None
        finally:
            session.close()
        return outputs, METRICS[self.metric](outputs, data, reference if reference is not None else outputs)

    def time_left(self) -> float:
        return self.time_budget_s - (time.perf_counter() - self._started)

    def _cost(self, candidate: Candidate) -> float:
        speed = candidate.measurement.speed
        return speed.latency_p50_ms if self.objective == "latency" else -speed.throughput_rows_s

    def try_recipe(self, recipe: Recipe, baseline: Candidate, exclude: Sequence[str] = ()) -> Candidate:
        """Apply ``recipe`` (keeping ``exclude`` nodes in float), prepare the result for the recipe's
        engine (compiling it, for engines that compile ahead of time) and measure it."""
        slug = re.sub(r"[^a-z0-9]+", "-", recipe.name.lower()).strip("-") + (f"-keep{len(exclude)}" if exclude else "")
        path = self.workdir / f"{slug}.onnx"
        ctx = PassContext(self.signature, self.calibration, tuple(exclude))
        try:
            notes = apply_recipe(recipe, self.model, path, ctx)
            folder = self.workdir / f"{slug}-{recipe.engine}"
            folder.mkdir(exist_ok=True)
            served = prepare(recipe.engine, path, folder, self.signature, self._engine_options(recipe),
                             time_budget_s=max(0.0, self.time_left()) * self.compile_share)
        except Exception as exc:  # passes run third-party code (ORT's fusions assert, e.g. "0 heads, 384 hidden"):
            # any failure skips this recipe with its reason, the search goes on
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
            log.warning("recipe %s skipped: %s", recipe.name, reason)
            return Candidate(recipe, error=reason)
        candidate = self.evaluate(recipe, served, baseline, exclude)
        candidate.notes = notes + candidate.notes
        candidate.kept_float = tuple(exclude)
        return candidate

    def _engine_options(self, recipe: Recipe) -> RuntimeOptions:
        return replace(self.options, engine=recipe.engine)

    def _load(self, path: Path, recipe: Recipe):
        session = load_file(path, self._engine_options(recipe))
        return self.wrap(session) if self.wrap is not None else session

    def evaluate(self, recipe: Recipe, path: Path, baseline: Candidate | None = None, exclude: Sequence[str] = ()) -> Candidate:
        """Load ``path`` with the recipe's engine and measure size, memory, speed and quality; outputs of
        an engine other than ONNX Runtime must first match ONNX Runtime's on the same recipe."""
        peak = PeakMemory().begin()  # the most memory loading and running this candidate took
        try:
            session = self._load(path, recipe)
            outputs = run_all(session, self.eval_data, self.batch_size)
        except Exception as exc:  # engines raise their own types; a candidate that cannot run is skipped with its reason
            if baseline is not None:
                log.warning("recipe %s skipped: %s: %s", recipe.name, type(exc).__name__, str(exc).strip()[:300])
            return Candidate(recipe, path, error=f"{type(exc).__name__}: {(str(exc).strip() or 'no message').splitlines()[0]}")
        if baseline is None:
            self.reference = outputs
        twin_key = (tuple(step.describe() for step in recipe.steps), tuple(exclude))
        if recipe.engine == "onnxruntime":
            self._ort_outputs[twin_key] = outputs
        else:
            twin = self._ort_outputs.get(twin_key)
            mismatch = outputs_mismatch(outputs, twin, loose=recipe.quantizes) if twin is not None else None
            if mismatch:
                session.close()
                return Candidate(recipe, path, error=f"outputs differ from ONNX Runtime's on the same recipe: {mismatch}; "
                                 "not served")
        quality = METRICS[self.metric](outputs, self.eval_data, self.reference)
        speed = (Speed(math.nan, math.nan, math.nan, self.batch_size) if self.skip_speed else
                 measure_speed(session, self.eval_data, batch_size=self.batch_size, min_time_s=self.speed_time_s))
        measurement = Measurement(file_size(path), speed, quality, self.metric, peak.end())
        session.close()
        candidate = Candidate(recipe, path, measurement)
        if baseline is not None:
            candidate.drop = quality_drop(self.metric, baseline.measurement.quality, quality)
            candidate.within_budget = candidate.drop <= self.budget.allowed(baseline.measurement.quality) + 1e-12
        else:
            candidate.drop = 0.0
        return candidate

    def keep_sensitive_in_float(self, recipe: Recipe, baseline: Candidate) -> list[Candidate]:
        """Rank quantized layers by the drop each causes alone; keep the worst 1, 2, 4... in float."""
        ranking = self.sensitivity(recipe, baseline)
        tried: list[Candidate] = []
        keep = 1
        while ranking and keep <= len(ranking) and self.time_left() > 0:
            exclude = [name for name, _ in ranking[:keep]]
            rescued = self.try_recipe(replace(recipe, name=f"{recipe.name}, {keep} layer(s) in float"), baseline, exclude)
            rescued.notes.append("sensitivity: " + ", ".join(f"{n} ({d:+.4f})" for n, d in ranking[:keep]))
            if rescued.within_budget or rescued.error:
                tried.append(rescued)
                break
            if tried and rescued.drop > 0.9 * tried[-1].drop:
                rescued.notes.append("keeping more layers in float did not help: the loss comes from elsewhere")
                tried.append(rescued)
                break
            tried.append(rescued)
            keep *= 2
        return tried

    def sensitivity(self, recipe: Recipe, baseline: Candidate) -> list[tuple[str, float]]:
        """(node, quality drop when only that node is quantized), worst first."""
        index = next(i for i, s in enumerate(recipe.steps) if s.op in QUANTIZING)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = Path(tmp) / "prefix.onnx"
            apply_recipe(Recipe("prefix", recipe.steps[:index]), self.model, prefix, PassContext(self.signature, self.calibration))
            step = recipe.steps[index]
            if step.op == "static_int8":
                prefix, _ = quantize.pre_process(prefix, Path(tmp) / "prepared.onnx")
                step = replace(step, params={**step.params, "preprocess": False})
            nodes = quantize.quantizable_nodes(prefix)
            single = Recipe("one layer", (step,))
            ranking = []
            for node in nodes:
                if self.time_left() <= 0:
                    break
                searcher = replace(self, model=prefix, workdir=Path(tmp), skip_speed=True, progress=False)
                result = searcher.try_recipe(single, baseline, exclude=[n for n in nodes if n != node])
                ranking.append((node, result.drop if result.drop is not None else math.inf))
        return sorted(ranking, key=lambda item: -item[1])


def keep_chosen(result: SearchResult, dst: Path) -> Path:
    """Copy the chosen candidate's file to ``dst``."""
    if result.chosen is None or result.chosen.path is None:
        raise LeanserveError("no candidate is within the accuracy budget")
    shutil.copyfile(result.chosen.path, dst)
    return dst
