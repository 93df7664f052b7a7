"""Live quality from labels, kept incrementally: a window of each version's newest labels."""

import numpy as np

from leanserve.monitor.feedback import QualityWindow
from leanserve.monitor.quality import QualityCounts, rolling_quality

SCORES = np.array([[0.1, 0.7, 0.2]], np.float32)  # arg-max: class 1


def test_accuracy_counts_only_the_newest_labels():
    window = QualityWindow(size=3)
    for label in (0, 1, 1, 1):  # the wrong first label falls out of the window
        window.add(SCORES, label)
    quality = window.quality(version=2)
    assert (quality.metric, quality.counts, quality.samples) == ("accuracy", QualityCounts(3, 3), 3)


def test_a_value_label_in_the_window_turns_accuracy_into_mean_absolute_error():
    window = QualityWindow(size=3)
    window.add(np.array([[2.5]]), 2.0)
    window.add(np.array([[1.0]]), 2)
    quality = window.quality(version=1)
    assert quality.metric == "mae" and quality.value == 0.75 and quality.counts is None
    window.add(np.array([[1.0]]), 1)
    window.add(np.array([[1.0]]), 1)
    window.add(np.array([[1.0]]), 1)  # the value label is out of the window: accuracy again
    assert window.quality(version=1).metric == "accuracy"


def test_the_window_agrees_with_the_quality_read_from_rows():
    rng = np.random.default_rng(0)
    rows = [{"version": 1, "outputs": {"y": rng.random((1, 4))}, "label": np.asarray(int(rng.integers(4)))} for _ in range(200)]
    window = QualityWindow(size=1000)
    for row in rows:
        window.add(row["outputs"]["y"], int(row["label"]))
    assert window.quality(1).counts == rolling_quality(rows)[0].counts
