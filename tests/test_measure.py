"""Shared measurement: peak memory of a stretch of work, not the process's lifetime peak."""

import numpy as np

from leanserve.measure import PeakMemory


def test_peak_memory_sees_memory_freed_before_the_end_and_resets_between_stretches():
    with PeakMemory() as big:
        block = np.ones(40_000_000 // 8)  # 40 MB, touched
        del block
    with PeakMemory() as idle:
        pass
    assert big.bytes is not None and 35e6 < big.bytes < 60e6
    assert idle.bytes is not None and idle.bytes < 5e6  # the first peak does not carry over
