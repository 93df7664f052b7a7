"""Shadow traffic: a copy of each request a shadowed model answers goes to its shadow version, off the
request path; the two answers are compared and the agreement counted (for the rollout guard and the
dashboard). The client only ever sees the primary's answer."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from leanserve.errors import LeanserveError
from leanserve.serve.observers import SUCCESS, Call

log = logging.getLogger(__name__)


class ShadowObserver:
    """Starts a shadow copy after each successful request routed with a shadow version."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self._tasks: set[asyncio.Task] = set()
        self._counts: dict[tuple[str, int, int], list[int]] = {}  # (model, primary, shadow) -> [agreed, compared]

    def after(self, call: Call) -> None:
        shadow = call.shadow
        if shadow is None or call.outcome != SUCCESS:
            return
        if shadow.batcher.queue_depth >= shadow.batcher.config.max_queue_size // 2:
            return  # the shadow never competes with live traffic: skip when it is backed up
        task = asyncio.get_running_loop().create_task(self._compare(call.handle, shadow, call.request.inputs, call.outputs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, primary, shadow, inputs, expected: dict[str, np.ndarray]) -> None:
        labels = (primary.ref.name, str(primary.ref.version), str(shadow.ref.version))
        try:
            shadow.signature.validate_inputs(inputs, allow_nonfinite=True)
            got, _ = await shadow.batcher.infer(inputs, list(expected))
            result = "agree" if outputs_agree(expected, got) else "disagree"
        except LeanserveError as exc:
            log.warning("shadow %s of %s failed: %s", labels[2], labels[0], exc)
            result = "error"
        self.metrics.shadow.labels(*labels, result).inc()
        counts = self._counts.setdefault((labels[0], primary.ref.version, shadow.ref.version), [0, 0])
        counts[0] += result == "agree"
        counts[1] += 1
        self.metrics.shadow_agreement.labels(*labels).set(counts[0] / counts[1])

    def agreement(self, name: str, version: int, shadow: int | None = None) -> float | None:
        """Share of shadow comparisons that agreed, for ``version`` as primary (and ``shadow`` as the
        shadow, when given); None when there were none."""
        counts = [c for (model, primary, other), c in self._counts.items()
                  if model == name and primary == version and (shadow is None or other == shadow)]
        total = sum(c[1] for c in counts)
        return sum(c[0] for c in counts) / total if total else None

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for shadow copies in flight."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)


def outputs_agree(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> bool:
    """Do two versions agree? Class scores: same top-1 per row; other outputs: close in value."""
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            return False
        if want.dtype.kind == "f" and want.ndim == 2 and want.shape[1] > 1:
            if not np.array_equal(want.argmax(axis=1), have.argmax(axis=1)):
                return False
        elif want.dtype.kind in "fc":
            if not np.allclose(want, have, rtol=1e-3, atol=1e-4):
                return False
        elif not np.array_equal(want, have):
            return False
    return True
