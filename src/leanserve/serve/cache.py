"""Response cache: an LRU of outputs keyed by a hash of the inputs, bounded in bytes.

Written here because the peers (cachetools, functools.lru_cache) bound entries by count, not bytes,
and cannot hash numpy arrays; this is an OrderedDict with a byte budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np


def request_key(version: int, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> bytes:
    """A digest of a request: version, requested outputs, and every input's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(str(version).encode())
    digest.update(repr(sorted(outputs or ())).encode())
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype == object:
            for item in array.ravel():
                digest.update(len(item).to_bytes(4, "little"))
                digest.update(item)
        else:
            digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


class ResponseCache:
    """Least-recently-used outputs, evicted once their total size passes ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in outputs.values()) + len(key)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = ({k: v.copy() for k, v in outputs.items()}, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)


class CacheObserver:
    """The response cache on the request path: answers a repeated request from the version's cache (when
    the version has one, ``cache.max_bytes`` > 0), and stores what the engine answered."""

    def before(self, call):
        cache = call.handle.cache
        if cache is None:
            return None
        key = call.scratch = request_key(call.handle.ref.version, call.inputs, call.request.output_names)
        outputs = cache.get(key)
        (call.handle.metrics.cache_hit if outputs is not None else call.handle.metrics.cache_miss).inc()
        return outputs

    def after(self, call) -> None:
        if call.handle.cache is not None and call.outcome == "success" and call.scratch is not None:
            call.handle.cache.put(call.scratch, call.outputs)
