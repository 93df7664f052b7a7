"""The trade-off report of an optimization run: Markdown, JSON and a PNG of quality against latency.

Each candidate has two quality figures, labelled: ``selection_<metric>`` on the rows the search chose
on, and ``holdout_<metric>`` on rows it never saw (the one to trust; the plot shows it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from leanserve.measure import cpu_description
from leanserve.optimize.search import Candidate, SearchResult

REPORT_FILES = ("report.md", "report.json", "pareto.png")


def _row(candidate: Candidate, result: SearchResult, chosen: bool) -> dict[str, Any]:
    m = candidate.measurement
    return {
        "recipe": candidate.recipe.name,
        "engine": candidate.recipe.engine,
        "steps": candidate.recipe.describe(),
        "size_bytes": m.size_bytes if m else None,
        "latency_p50_ms": m.speed.latency_p50_ms if m else None,
        "latency_p99_ms": m.speed.latency_p99_ms if m else None,
        "throughput_rows_s": m.speed.throughput_rows_s if m else None,
        "memory_bytes": m.memory_bytes if m else None,
        f"selection_{result.metric}": m.quality if m else None,
        "selection_drop": candidate.drop,
        f"holdout_{result.metric}": candidate.holdout_quality,
        "holdout_drop": candidate.holdout_drop,
        "within_budget": candidate.within_budget,
        "chosen": chosen,
        "kept_float": list(candidate.kept_float),
        "notes": candidate.notes,
        "error": candidate.error,
    }


def report_dict(result: SearchResult) -> dict[str, Any]:
    rows = [_row(c, result, c is result.chosen) for c in [result.baseline, *result.candidates]]
    return {"metric": result.metric, "budget": result.budget.describe(), "elapsed_s": round(result.elapsed_s, 1),
            "cpu": cpu_description(), "batch_size": result.baseline.measurement.speed.batch_size,
            "holdout": result.holdout.to_dict() if result.holdout else None,
            "skipped_time_budget": list(result.skipped), "candidates": rows}


def _split_line(data: dict[str, Any]) -> str:
    split = data["holdout"]
    if split is None:
        return "Quality was measured only on the rows the search chose on (no held-out rows): treat it as optimistic."
    how = ("a separate held-out file" if split["source"] == "given" else
           f"{split['holdout_fraction']:.0%} of the evaluation rows drawn with seed {split['seed']}"
           + (", in proportion per label" if split["stratified"] else ""))
    return (f"Chosen on the selection part ({split['selection_rows']} rows); quality reported on the held-out part "
            f"({split['holdout_rows']} rows, {how}), which the choice never saw.")


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report_markdown(data: dict[str, Any]) -> str:
    cpu = data["cpu"]
    lines = [
        "# Optimization report", "",
        f"CPU: {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags']) or 'no AVX2/VNNI'}). "
        f"Metric: {data['metric']}; budget: drop ≤ {data['budget']} (judged on the selection part); "
        f"search took {data['elapsed_s']} s.", "", _split_line(data), "",
        f"| recipe | engine | size (KB) | p50 ms (b=1) | p99 ms | rows/s (b={data['batch_size']}) | peak memory (MB) "
        f"| selection {data['metric']} | selection drop | held-out {data['metric']} | held-out drop | within | chosen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    metric = data["metric"]
    for r in data["candidates"]:
        lines.append(
            f"| {r['recipe']} | {r['engine']} | {_fmt(r['size_bytes'] and r['size_bytes'] / 1024, '.0f')} "
            f"| {_fmt(r['latency_p50_ms'], '.3f')} | {_fmt(r['latency_p99_ms'], '.3f')} | {_fmt(r['throughput_rows_s'], ',.0f')} "
            f"| {_fmt(r['memory_bytes'] and r['memory_bytes'] / 1e6, '.1f')} | {_fmt(r[f'selection_{metric}'], '.4f')} "
            f"| {_fmt(r['selection_drop'], '+.4f')} | {_fmt(r[f'holdout_{metric}'], '.4f')} | {_fmt(r['holdout_drop'], '+.4f')} "
            f"| {'yes' if r['within_budget'] else 'no'} | {'**yes**' if r['chosen'] else ''} |"
        )
    if data["skipped_time_budget"]:
        lines += ["", f"Not tried, the time budget was spent: {', '.join(data['skipped_time_budget'])}."]
    lines += ["", "## Notes", ""]
    for r in data["candidates"]:
        details = r["notes"] + ([f"error: {r['error']}"] if r["error"] else [])
        if details:
            lines.append(f"- **{r['recipe']}** ({r['steps']}): " + "; ".join(details))
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower latency and higher quality are better), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(data: dict[str, Any], path: Path) -> None:
    """PNG of quality against latency, Pareto front drawn, chosen variant marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # held-out quality where the candidates were graded on it, else (said on the axis) the selection's
    part = "holdout" if data["holdout"] else "selection"
    key = f"{part}_{data['metric']}"
    rows = [r for r in data["candidates"] if r["latency_p50_ms"] is not None and r[key] is not None]
    points = [(r["latency_p50_ms"], r[key] if data["metric"] != "mse" else -r[key]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"onnxruntime": "o", "openvino": "s", "tvm": "^", "torch": "D"}
    for engine in sorted({r.get("engine", "onnxruntime") for r in rows}):
        mine = [(r, p) for r, p in zip(rows, points) if r.get("engine", "onnxruntime") == engine]
        ax.scatter([p[0] for _, p in mine], [p[1] for _, p in mine], marker=markers.get(engine, "x"), label=engine,
                   c=["tab:green" if r["within_budget"] else "tab:red" for r, _ in mine])
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", label="Pareto front")
    for r, (x, y) in zip(rows, points):
        ax.annotate(r["recipe"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if r["chosen"]:
            ax.scatter([x], [y], s=250, facecolors="none", edgecolors="black", label="chosen")
    ax.set_xlabel("latency p50 at batch 1 (ms)")
    ax.set_ylabel(("held-out " if part == "holdout" else "selection ") + (data["metric"] if data["metric"] != "mse" else "-mse"))
    ax.set_title("quality vs latency (green: within budget)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: SearchResult, folder: Path) -> list[Path]:
    """Write report.md, report.json and pareto.png into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    data = report_dict(result)
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str))
    (folder / "report.md").write_text(report_markdown(data))
    plot(data, folder / "pareto.png")
    return [folder / name for name in REPORT_FILES]
