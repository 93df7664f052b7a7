"""Shared measurement: peak memory of a stretch of work, not the process's lifetime peak."""

import mmap

import numpy as np

import pytest

from leanserve import measure
from leanserve.measure import PeakMemory


def test_peak_memory_sees_memory_freed_before_the_end_and_resets_between_stretches():
    # 40 MB of fresh pages, touched, then unmapped. Not a numpy array: late in the full suite, malloc served
    # 40 MB from memory it already held (resident before the stretch began), so no peak is there to see.
    with PeakMemory() as big:
        block = mmap.mmap(-1, 40_000_000)
        np.frombuffer(block, dtype=np.uint8)[::4096] = 1
        block.close()
    with PeakMemory() as idle:
        pass
    assert big.bytes is not None and 35e6 < big.bytes < 60e6, (big.bytes, big.start, big._hwm)
    assert idle.bytes is not None and idle.bytes < 5e6  # the first peak does not carry over


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", ["avx2"], True),                      # u8 x s8 pairs add in 16 bits and saturate
    ("x86_64", ["avx2", "avx512f"], True),
    ("x86_64", ["avx2", "avx512f", "avx512_vnni"], False),
    ("x86_64", ["avx2", "avx_vnni"], False),
    ("aarch64", [], False),
])
def test_int8_saturation_is_judged_from_the_cpu_flags(monkeypatch, machine, flags, saturates):
    monkeypatch.setattr(measure.platform, "machine", lambda: machine)
    monkeypatch.setattr(measure, "cpu_description", lambda: {"model": "test", "cores": 2, "flags": flags})
    assert measure.saturating_int8() is saturates
