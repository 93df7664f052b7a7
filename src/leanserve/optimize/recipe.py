"""Recipes: named sequences of ONNX passes, applied one after another through temporary files."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanserve.errors import InvalidInput
from leanserve.optimize import graph, openvino, quantize
from leanserve.optimize.steps import PassContext, StepResult

PassFn = Callable[..., StepResult]
PASSES: dict[str, PassFn] = {
    "graph": graph.optimize_graph,
    "transformer": graph.fuse_transformer,
    "dynamic_int8": quantize.dynamic_int8,
    "static_int8": quantize.static_int8,
    "fp16": quantize.to_fp16,
    "int4_weights": quantize.weight_only_int4,
    "blockwise_int8": quantize.blockwise_int8,
    "int4_embeddings": quantize.int4_embeddings,
    "openvino_int8": openvino.nncf_int8,
}
QUANTIZING = {"dynamic_int8", "static_int8", "int4_weights", "blockwise_int8", "int4_embeddings", "openvino_int8"}


@dataclass(frozen=True)
class Step:
    """One pass and its parameters."""

    op: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in PASSES:
            raise InvalidInput(f"unknown optimization pass {self.op!r}; known passes: {', '.join(PASSES)}")

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op}({args})" if args else self.op


@dataclass(frozen=True)
class Recipe:
    """A named sequence of passes. An empty recipe is the original model."""

    name: str
    steps: tuple[Step, ...] = ()
    engine: str = "onnxruntime"  # the engine the result is measured and served with

    def describe(self) -> str:
        steps = " -> ".join(s.describe() for s in self.steps) or "original"
        return steps if self.engine == "onnxruntime" else f"{steps} @ {self.engine}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [{"op": s.op, "params": dict(s.params)} for s in self.steps],
                "engine": self.engine}

    @property
    def quantizes(self) -> bool:
        return any(s.op in QUANTIZING for s in self.steps)


def parse_recipe(text: str) -> Recipe:
    """Parse ``op[:key=value,...]+op...[@ENGINE]`` as the CLI takes it, e.g. ``graph+static_int8:method=entropy``,
    ``openvino_int8@openvino``, or ``@tvm`` (the original model compiled by TVM)."""
    from leanserve.runtime import ENGINES

    text, _, engine = text.partition("@")
    engine = ENGINE_ALIASES.get(engine.strip(), engine.strip()) or "onnxruntime"
    if engine not in ENGINES:
        raise InvalidInput(f"recipe {text!r}: unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")
    steps = []
    for part in filter(None, (p.strip() for p in text.split("+"))):
        op, _, args = part.partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, args.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidInput(f"recipe step {part!r}: parameters are key=value")
            params[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
        steps.append(Step(op, params))
    name = text or "original"
    return Recipe(name if engine == "onnxruntime" else f"{name} @ {engine}", tuple(steps), engine)


ENGINE_ALIASES = {"ort": "onnxruntime", "ov": "openvino"}


def parse_engines(text: str | Sequence[str]) -> tuple[str, ...]:
    """``ort,openvino,tvm`` -> engine names (aliases resolved, order kept); InvalidInput naming unknown ones."""
    from leanserve.runtime import ENGINES

    items = text.split(",") if isinstance(text, str) else list(text)
    engines = []
    for item in filter(None, (i.strip() for i in items)):
        engine = ENGINE_ALIASES.get(item, item)
        if engine not in ENGINES:
            raise InvalidInput(f"unknown engine {item!r}; known engines: {', '.join(ENGINES)} (ort and ov are short forms)")
        if engine not in engines:
            engines.append(engine)
    if not engines:
        raise InvalidInput("--engines: name at least one engine, e.g. ort,openvino")
    return tuple(engines)


def engine_recipes(engine: str, has_calibration: bool) -> list[Recipe]:
    """Candidates measured on an engine other than ONNX Runtime: the original model as that engine runs
    it, and the engine's own int8 where it has one."""
    recipes = [Recipe(f"original @ {engine}", (), engine)]
    if engine == "openvino" and has_calibration:
        recipes.append(Recipe("NNCF int8 @ openvino", (Step("openvino_int8"),), engine))
    return recipes


def apply_recipe(recipe: Recipe, src: Path, dst: Path, ctx: PassContext) -> list[str]:
    """Run every step of ``recipe`` on ``src`` and write the result to ``dst``; returns the notes."""
    notes: list[str] = []
    src = Path(src).resolve()
    dst = Path(dst).resolve()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        # ONNX Runtime's quantization tools drop temporary files (shape inference, external data) into
        # the working directory; keep them in this step's temporary folder.
        current = src
        for i, step in enumerate(recipe.steps):
            out = Path(tmp) / f"step{i}.onnx"
            step_ctx = ctx if step.op in QUANTIZING or step.op == "fp16" else PassContext(ctx.signature, ctx.calibration)
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress to stdout
                result = PASSES[step.op](current, out, step_ctx, **step.params)
            notes.extend(n for n in result.notes if n)
            current = out
        shutil.copyfile(current, dst)
    return notes


def default_recipes(transformer: bool, has_calibration: bool, gpu: bool = False) -> list[Recipe]:
    """Candidate recipes in order of expected gain on this hardware."""
    base = (Step("transformer"),) if transformer else (Step("graph", {"level": "basic"}),)
    recipes = []
    if transformer:
        recipes.append(Recipe("dynamic int8, fused", base + (Step("dynamic_int8"),)))
        # slower than dynamic int8 but closer to fp32: the pick when the budget is tight
        recipes.append(Recipe("blockwise int8, fused", base + (Step("blockwise_int8"),)))
    if has_calibration:
        recipes += [Recipe(f"static int8 ({m})", (Step("static_int8", {"method": m}),)) for m in ("minmax", "percentile", "entropy")]
    # Unfused too for transformers: ONNX Runtime fuses the quantized graph itself at load, and on some
    # CPUs that beats quantizing the pre-fused graph (a one-off run on an AVX-512 VNNI EPYC, by a few %).
    recipes.append(Recipe("dynamic int8", (Step("dynamic_int8"),)))
    if gpu:
        recipes.append(Recipe("fp16", base + (Step("fp16"),)))
    recipes.append(Recipe("graph fusions" if transformer else "graph (extended)",
                          base if transformer else (Step("graph", {"level": "extended"}),)))
    if transformer:
        recipes.append(Recipe("int4 weights, fused", base + (Step("int4_weights"),)))
    return recipes
