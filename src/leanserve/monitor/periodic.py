"""A task that runs ``tick()`` every ``interval_s`` seconds on the event loop, for the monitoring round
and the rollout guard. A failing round is logged and the next one runs as usual."""

from __future__ import annotations

import abc
import asyncio
import logging

from leanserve.errors import LeanserveError

log = logging.getLogger(__name__)


class Periodic(abc.ABC):
    """Subclasses set ``interval_s`` and implement ``tick``."""

    interval_s: float = 1.0
    _task: asyncio.Task | None = None

    @abc.abstractmethod
    async def tick(self) -> None:
        """One round of work."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except (LeanserveError, OSError, ValueError) as exc:
                log.error("%s round failed: %s", type(self).__name__, exc)
