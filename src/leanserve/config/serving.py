"""Serving-side settings of a model: which versions load, how their engine runs, how requests are
batched and cached, and how traffic is split across versions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from leanserve.config.parse import _check, _is_int, is_version_text


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are loaded besides those its traffic settings send requests to.

    ``latest``: the newest ``n`` versions that have taken traffic (n=2 keeps the previous served version
    warm for an instant rollback; registered versions are never loaded by it); ``all``: every version;
    ``specific``: the listed ones. Loaded versions answer requests that name them
    (``/v2/models/M/versions/N/infer``); only the traffic settings send them unaddressed requests.
    A model without traffic settings (written before them, or folders copied in by hand) serves the
    newest ``n`` versions that are neither derived (a parent in their provenance) nor edge artifacts.
    """

    kind: str = "latest"
    n: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(self.kind in ("latest", "all", "specific"), "version_policy.kind", f"expected latest, all or specific, got {self.kind!r}")
        _check(_is_int(self.n) and self.n >= 1, "version_policy.n", f"expected an integer >= 1, got {self.n!r}")
        _check(all(_is_int(v) and v >= 1 for v in self.versions), "version_policy.versions", "expected integers >= 1")
        _check(self.kind != "specific" or bool(self.versions), "version_policy.versions", "a specific policy needs at least one version")

    def select(self, available: list[int]) -> list[int]:
        """Return the versions (ascending) of ``available`` this policy serves."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.n:]


@dataclass(frozen=True)
class RuntimeOptions:
    """How a version's engine is set up. ``0`` threads means the engine's own default."""

    engine: str | None = None  # None: the version's recorded runtime
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    providers: tuple[str, ...] = ()  # empty: CUDA/TensorRT when present, else CPU
    graph_optimization_level: str = "all"
    spin_wait: bool = False  # let idle engine threads spin (lower single-stream latency, more CPU)
    # Engines that tune for one goal (OpenVINO's performance hints): "auto" follows the serving mode,
    # throughput when the version is dynamically batched, latency otherwise.
    performance_hint: str = "auto"
    device: str = "auto"  # OpenVINO/TVM device: auto (best present), cpu, gpu, npu
    # Engine precision: fp32, fp16, bf16 (OpenVINO on CPUs with AVX-512 BF16/AMX, TensorRT), or int8
    # (TensorRT; needs the version's calibration table or a QDQ model)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check(isinstance(self.spin_wait, bool), "runtime.spin_wait", "expected true or false")
        _check(self.performance_hint in ("auto", "latency", "throughput"), "runtime.performance_hint",
               f"expected auto, latency or throughput, got {self.performance_hint!r}")
        _check(self.device in ("auto", "cpu", "gpu", "npu"), "runtime.device",
               f"expected auto, cpu, gpu or npu, got {self.device!r}")
        _check(self.precision in ("fp32", "fp16", "bf16", "int8"), "runtime.precision",
               f"expected fp32, fp16, bf16 or int8, got {self.precision!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, f"runtime.{name}", f"expected an integer >= 0, got {value!r}")
        _check(
            self.graph_optimization_level in ("disable", "basic", "extended", "all"),
            "runtime.graph_optimization_level",
            f"expected disable, basic, extended or all, got {self.graph_optimization_level!r}",
        )


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of one model version's requests.

    Requests queue and are merged into one batch of up to ``max_batch_size`` rows, waiting at most
    ``max_queue_delay_us`` for more once the first arrives. A full queue (``max_queue_size`` requests)
    rejects new ones at once (HTTP 503 with Retry-After). ``pad_values`` gives, per input, the value
    that pads a variable dimension up to the longest in the batch. ``max_batch_tokens`` (text pipelines;
    0 = off) bounds a batch's padded size, rows x its longest text in tokens, so one long text does not
    pad a batch of short ones (text-embeddings-inference's token budget).
    """

    enabled: bool = True
    max_batch_size: int = 32
    max_queue_delay_us: int = 200
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 2048
    instances: int = 1
    timeout_ms: int = 30_000
    pad_values: Mapping[str, float] = field(default_factory=dict)
    max_batch_tokens: int = 0
    max_queue_wait_ms: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "batching.enabled", "expected true or false")
        for name, low in (("max_batch_size", 1), ("max_queue_delay_us", 0), ("max_queue_size", 1), ("instances", 1),
                          ("timeout_ms", 1), ("max_batch_tokens", 0), ("max_queue_wait_ms", 0)):
            value = getattr(self, name)
            _check(_is_int(value) and value >= low, f"batching.{name}", f"expected an integer >= {low}, got {value!r}")
        _check(
            all(_is_int(b) and 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes),
            "batching.preferred_batch_sizes",
            f"expected integers between 1 and max_batch_size ({self.max_batch_size})",
        )
        _check(isinstance(self.pad_values, Mapping), "batching.pad_values", "expected an object of input name -> number")
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(self.preferred_batch_sizes)))


@dataclass(frozen=True)
class CacheConfig:
    """Response cache: LRU keyed by a hash of the inputs, bounded in bytes. ``max_bytes=0`` is off."""

    max_bytes: int = 0

    def __post_init__(self) -> None:
        _check(_is_int(self.max_bytes) and self.max_bytes >= 0, "cache.max_bytes", f"expected an integer >= 0, got {self.max_bytes!r}")


@dataclass(frozen=True)
class TrafficConfig:
    """How live traffic is split across loaded versions.

    ``weights`` maps version -> relative weight; empty sends everything to the newest loaded version.
    ``shadow`` receives a copy of live traffic off the critical path. Requests carrying an
    ``x-routing-key`` header (or a ``routing_key`` request parameter) are assigned by its hash, so one
    user always sees one version. ``history`` keeps earlier weights for ``rollback``.
    """

    weights: Mapping[str, int] = field(default_factory=dict)
    shadow: int | None = None
    history: tuple[Mapping[str, int], ...] = ()

    def __post_init__(self) -> None:
        _check(isinstance(self.weights, Mapping), "traffic.weights", "expected an object of version -> weight")
        clean: dict[str, int] = {}
        for version, weight in self.weights.items():
            _check(is_version_text(version), "traffic.weights", f"version {version!r} is not an integer >= 1 in ASCII digits")
            _check(_is_int(weight) and weight >= 0, "traffic.weights", f"weight of version {version} must be an integer >= 0, got {weight!r}")
            clean[str(int(version))] = weight
        _check(not clean or sum(clean.values()) > 0, "traffic.weights", "at least one version needs a weight above 0")
        _check(self.shadow is None or (_is_int(self.shadow) and self.shadow >= 1), "traffic.shadow", "expected a version number or null")
        object.__setattr__(self, "weights", clean)
        object.__setattr__(self, "history", tuple(dict(h) for h in self.history)[-20:])

    def version_weights(self) -> dict[int, int]:
        return {int(v): w for v, w in self.weights.items() if w > 0}

    def serving_only(self, version: int) -> TrafficConfig:
        """These settings with all traffic on ``version`` (a promotion); the current weights go to history.
        A shadow that is now the served version stops shadowing."""
        history = self.history + ((dict(self.weights),) if self.weights else ())
        return TrafficConfig(weights={str(version): 100}, shadow=None if self.shadow == version else self.shadow,
                             history=history)

    def ever_served(self) -> set[int]:
        """Versions that take traffic now or took it in a remembered earlier split."""
        served = set(self.version_weights())
        for earlier in self.history:
            served |= {int(v) for v, w in earlier.items() if w > 0}
        return served
