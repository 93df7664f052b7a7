import numpy as np

from leanserve.serve.cache import ResponseCache, request_key


def test_keys_depend_on_values_dtype_shape_version_and_outputs():
    x = {"x": np.ones((2, 2), np.float32)}
    base = request_key(1, x, None)
    assert base == request_key(1, {"x": np.ones((2, 2), np.float32)}, None)
    assert base != request_key(2, x, None)
    assert base != request_key(1, {"x": np.ones((4,), np.float32)}, None)
    assert base != request_key(1, {"x": np.ones((2, 2), np.float64)}, None)
    assert base != request_key(1, x, ["y"])
    assert request_key(1, {"t": np.array([b"ab", b"c"], dtype=object)}, None) != request_key(1, {"t": np.array([b"a", b"bc"], dtype=object)}, None)


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    cache = ResponseCache(max_bytes=3 * (400 + 20))
    for i in range(3):
        cache.put(bytes([i]) * 20, {"y": np.zeros(100, np.float32)})
    assert cache.get(bytes([0]) * 20) is not None  # 0 becomes most recent
    cache.put(bytes([3]) * 20, {"y": np.zeros(100, np.float32)})
    assert cache.get(bytes([1]) * 20) is None and cache.get(bytes([0]) * 20) is not None
    assert cache.bytes <= cache.max_bytes and len(cache) == 3


def test_entries_larger_than_the_budget_are_not_cached():
    cache = ResponseCache(max_bytes=100)
    cache.put(b"k", {"y": np.zeros(1000, np.float32)})
    assert cache.get(b"k") is None and cache.bytes == 0
