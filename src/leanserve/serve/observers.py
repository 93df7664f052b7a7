"""What the data plane hands to optional features: one ``Call`` per request, and the ``Observer`` shape.

The core (``dataplane.py``) routes, validates, runs and answers. Everything else that looks at requests
(the response cache, shadow copies, live statistics, the prediction log, live explanation sampling) is
an observer, composed once when the server is built (``leanserve.server``): a feature that is off is
not in the list, so it costs nothing per request. The shape follows ASGI middleware and OpenTelemetry's
span processors; the core never reads a feature's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from leanserve.serve.protocol.codec import InferRequest
    from leanserve.serve.loading import LoadedVersion

SUCCESS, ERROR, INVALID = "success", "error", "invalid"


@dataclass(slots=True)
class Call:
    """One inference request as the data plane served it.

    ``inputs`` are the validated inputs the engine saw (request parameters a version turns into inputs
    included); ``outcome`` is ``success``, ``error`` (the server's fault: engine failure, overload,
    timeout) or ``invalid`` (the client's input); ``elapsed_s`` covers queue and compute.
    """

    model: str
    handle: LoadedVersion
    request: InferRequest
    protocol: str
    started: float  # time.perf_counter() when the data plane took the request
    shadow: LoadedVersion | None = None
    inputs: dict[str, np.ndarray] | None = None
    outputs: dict[str, np.ndarray] | None = None
    outcome: str = ERROR
    elapsed_s: float = 0.0
    scratch: Any = None  # one value an observer's ``before`` leaves for its own ``after`` (the cache key)


class Observer(Protocol):
    """An optional feature on the request path, by shape: it has ``before``, ``after`` or both (features
    outside ``serve/`` implement it without importing it). A hook that is not there is not called.

    ``before(call)`` runs after validation and before the engine; it may answer instead of the engine
    (the cache) by returning outputs, and nothing else may block. ``after(call)`` runs once the answer is
    known, for every outcome; it must be cheap and non-blocking: hand work off, never compute.
    """

    def before(self, call: Call) -> dict[str, np.ndarray] | None: ...

    def after(self, call: Call) -> None: ...


def hooks(observers: list) -> tuple[list[Callable[[Call], Any]], list[Callable[[Call], Any]]]:
    """The ``before`` and ``after`` methods ``observers`` have, in order."""
    before = [o.before for o in observers if hasattr(o, "before")]
    after = [o.after for o in observers if hasattr(o, "after")]
    return before, after
