"""The batching tuner's candidates: one serving setting to measure (``Candidate``: batching, queue delay,
engine instances, intra-op threads), the default grid, and the ``--grid`` and ``--concurrency`` specs the
CLI parses into candidates and connection counts. ``tune.py`` measures them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from leanserve.config import ModelConfig
from leanserve.errors import InvalidInput

MAX_CANDIDATES = 48
GRID_KEYS = ("max_batch_size", "max_queue_delay_us", "instances", "intra_op_threads")


@dataclass(frozen=True)
class Candidate:
    """One serving setting to measure. ``max_batch_size=None`` is batching off; ``intra_op_threads=0``
    leaves the engine its own default."""

    max_batch_size: int | None
    max_queue_delay_us: int = 0
    instances: int = 1
    intra_op_threads: int = 0

    def __post_init__(self) -> None:
        for name, low in (("max_batch_size", 1), ("max_queue_delay_us", 0), ("instances", 1), ("intra_op_threads", 0)):
            value = getattr(self, name)
            if name == "max_batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInput(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_batch_size is None and self.max_queue_delay_us:
            object.__setattr__(self, "max_queue_delay_us", 0)  # no queue delay without batching

    @classmethod
    def of(cls, config: ModelConfig) -> Candidate:
        """The candidate ``config`` already describes."""
        batching = config.batching
        return cls(batching.max_batch_size if batching.enabled else None, batching.max_queue_delay_us,
                   batching.instances, config.runtime.intra_op_threads)

    @property
    def batch(self) -> str:
        """The batching part, e.g. ``off`` or ``32@200us``."""
        return "off" if self.max_batch_size is None else f"{self.max_batch_size}@{self.max_queue_delay_us}us"

    @property
    def label(self) -> str:
        threads = self.intra_op_threads or "auto"
        return f"batch {self.batch}, {self.instances} inst, {threads} thr"

    def apply(self, config: ModelConfig) -> ModelConfig:
        """``config`` with this candidate's batching, instances and intra-op threads; nothing else changes."""
        batching = dataclasses.replace(config.batching, enabled=self.max_batch_size is not None, instances=self.instances)
        if self.max_batch_size is not None:
            batching = dataclasses.replace(
                batching, max_batch_size=self.max_batch_size, max_queue_delay_us=self.max_queue_delay_us,
                preferred_batch_sizes=tuple(b for b in batching.preferred_batch_sizes if b <= self.max_batch_size))
        runtime = dataclasses.replace(config.runtime, intra_op_threads=self.intra_op_threads)
        return config.replace(batching=batching, runtime=runtime)


def default_grid() -> tuple[Candidate, ...]:
    """Nine settings instead of the full 20-point product: every batching variant at one instance and one
    thread, then a second instance or a second thread on batching off and on the default batching."""
    batching = [None, (8, 200), (8, 1000), (32, 200), (32, 1000)]
    grid = [Candidate(*(b or (None, 0)), 1, 1) for b in batching]
    for batch in ((None, 0), (32, 200)):
        grid += [Candidate(*batch, 2, 1), Candidate(*batch, 1, 2)]
    return tuple(grid)


def parse_grid(spec: str, current: Candidate) -> tuple[Candidate, ...]:
    """Candidates from ``KEY=V1,V2;KEY=...``: the product of the values, keys from ``GRID_KEYS``; a key not
    given keeps ``current``'s value, and ``off`` as a max_batch_size turns batching off. Raises InvalidInput
    naming the bad part."""
    values: dict[str, list[int | None]] = {}
    for part in filter(None, (p.strip() for p in spec.replace(" ", ";").split(";"))):
        key, sep, raw = part.partition("=")
        if not sep or key not in GRID_KEYS:
            raise InvalidInput(f"--grid {part!r}: expected KEY=V1,V2,... with KEY one of {', '.join(GRID_KEYS)}, "
                               "e.g. max_batch_size=off,8,32;max_queue_delay_us=200,1000")
        if key in values:
            raise InvalidInput(f"--grid: {key} is given twice")
        values[key] = [_grid_value(key, v.strip(), part) for v in raw.split(",")]
    if not values:
        raise InvalidInput("--grid is empty; e.g. max_batch_size=off,8,32;instances=1,2")
    if math.prod(len(v) for v in values.values()) > MAX_CANDIDATES:
        raise InvalidInput(f"--grid makes {math.prod(len(v) for v in values.values())} candidates; at most "
                           f"{MAX_CANDIDATES} (each runs at every concurrency)")
    grid = []
    for combo in itertools.product(*values.values()):
        try:
            grid.append(dataclasses.replace(current, **dict(zip(values, combo))))
        except InvalidInput as exc:
            raise InvalidInput(f"--grid: {exc}") from None
    return tuple(dict.fromkeys(grid))  # batching off makes every delay the same candidate


def _grid_value(key: str, raw: str, part: str) -> int | None:
    if key == "max_batch_size" and raw == "off":
        return None
    if not raw.isdigit():
        raise InvalidInput(f"--grid {part!r}: {raw!r} is not a whole number" + (" or 'off'" if key == "max_batch_size" else ""))
    return int(raw)


def with_current(grid: Sequence[Candidate], current: Candidate) -> tuple[Candidate, ...]:
    """``current`` first, then ``grid`` without repeats: every run measures the setting it would replace."""
    return tuple(dict.fromkeys((current, *grid)))


def parse_concurrency(spec: str) -> tuple[int, ...]:
    """``1,8,32`` as ascending connection counts; raises InvalidInput."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise InvalidInput(f"--concurrency {spec!r}: expected whole numbers >= 1, e.g. 1,8,32")
    return tuple(sorted({int(p) for p in parts}))
