"""The scratch arena: every int8 buffer's offset, planned at generation time from the buffers' lifetimes.

Each buffer lives from the layer that writes it to the last layer that reads it. Buffers whose lifetimes
overlap get disjoint byte ranges; the rest may share. Placement is greedy, largest first, each at the
lowest offset free during its whole lifetime (TensorFlow Lite Micro's greedy memory planner does the
same; it lives in C++ inside TFLM, so it is a few lines here).
"""

from __future__ import annotations

from dataclasses import dataclass

from leanserve.deploy.edge.c.program import Program

ALIGN = 4  # bytes: each buffer starts word-aligned, so kernels on any core may read it in words


@dataclass(frozen=True)
class Arena:
    """Offsets of the buffers in the scratch arena, its size, and the lower bound no plan can beat (the
    most bytes live at one layer)."""

    offsets: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]
    size_bytes: int
    live_peak_bytes: int
    unshared_bytes: int  # what the buffers take with no sharing at all


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def plan_arena(program: Program) -> Arena:
    """Lifetimes of ``program``'s buffers and their greedy placement."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, layer in enumerate(program.layers):
        for name in (*layer.inputs, *([layer.output] if layer.output else [])):
            first.setdefault(name, index)
            last[name] = index
    lifetimes = {name: (first[name], last[name]) for name in first}
    sizes = {name: _aligned(program.buffers[name].size) for name in lifetimes}
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
    offsets: dict[str, int] = {}
    for name in sorted(lifetimes, key=lambda n: (-sizes[n], lifetimes[n][0])):
        start, end = lifetimes[name]
        overlapping = sorted((o, s) for o, s, a, b in placed if a <= end and start <= b)
        offset = 0
        for other_offset, other_size in overlapping:
            if offset + sizes[name] <= other_offset:
                break
            offset = max(offset, other_offset + other_size)
        offsets[name] = offset
        placed.append((offset, sizes[name], start, end))
    size = max((o + s for o, s, _, _ in placed), default=0)
    live = max((sum(sizes[n] for n, (a, b) in lifetimes.items() if a <= i <= b)
                for i in range(len(program.layers))), default=0)
    return Arena(offsets, lifetimes, size, live, sum(sizes.values()))
