import random
from collections import Counter

import pytest

from leanserve.config import TrafficConfig
from leanserve.errors import InvalidInput
from leanserve.traffic import choose_version, rollback, set_traffic


def test_without_weights_the_newest_loaded_version_serves():
    assert choose_version(TrafficConfig(), [1, 3, 2]) == 3


def test_weights_split_traffic_in_proportion():
    traffic = TrafficConfig(weights={"1": 90, "2": 10})
    rng = random.Random(0)
    counts = Counter(choose_version(traffic, [1, 2], rng=rng) for _ in range(5000))
    assert 0.07 < counts[2] / 5000 < 0.13


def test_routing_key_always_reaches_the_same_version():
    traffic = TrafficConfig(weights={"1": 50, "2": 50})
    for key in ("alice", "bob", "carol", "dave"):
        assert len({choose_version(traffic, [1, 2], key) for _ in range(20)}) == 1
    assert {choose_version(traffic, [1, 2], f"user-{i}") for i in range(50)} == {1, 2}


def test_weights_for_unloaded_versions_are_ignored():
    assert choose_version(TrafficConfig(weights={"7": 100}), [1, 2]) == 2
    assert choose_version(TrafficConfig(weights={"1": 1, "7": 99}), [1, 2]) == 1


def test_set_traffic_keeps_history_for_rollback():
    first = set_traffic(TrafficConfig(), {1: 100})
    canary = set_traffic(first, {1: 90, 2: 10}, shadow=3)
    assert canary.history == ({"1": 100},) and canary.shadow == 3
    back, version = rollback(canary, [1, 2, 3])
    assert version == 1 and back.weights == {"1": 100} and back.shadow is None
    promoted = set_traffic(canary, {2: 100})
    assert rollback(promoted, [1, 2, 3])[1] == 1


def test_rollback_without_history_goes_to_the_previous_version():
    back, version = rollback(TrafficConfig(), [1, 2, 3])
    assert version == 2 and back.weights == {"2": 100}
    with pytest.raises(InvalidInput, match="nothing to roll back to"):
        rollback(TrafficConfig(), [1])


@pytest.mark.parametrize("weights", [{"x": 1}, {"1": -1}, {"1": 0}])
def test_bad_weights_are_refused(weights):
    with pytest.raises(InvalidInput):
        TrafficConfig(weights=weights)
