"""Typed configuration: every knob has a name, a unit in its name, a default that works, and one reader.

``ModelConfig`` is what a model's ``config.json`` in the repository holds (what is not per version):
version policy, runtime options, batching, cache and traffic. Each part is a frozen dataclass that
validates itself; ``from_dict`` refuses unknown keys by name so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from leanserve.errors import InvalidInput

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and turning lists into tuples."""
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidInput(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(names))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidInput(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)


_VERSION_TEXT = re.compile(r"[0-9]+")


def is_version_text(value: Any) -> bool:
    """True for an int >= 1 or a string of ASCII digits naming one. ``str.isdigit`` is not enough: it
    accepts '²' and other Unicode digits that ``int()`` then refuses."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return isinstance(value, str) and _VERSION_TEXT.fullmatch(value) is not None and int(value) >= 1


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise InvalidInput(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


IMPORT_POLICIES = ("serve", "register")


@dataclass(frozen=True)
class LifecycleConfig:
    """What registering a version does to traffic.

    ``on_import`` applies to ``leanserve import``/``export --name`` (and ``Repository.add`` when the caller
    does not decide). ``register``, the default, only records the version, as MLflow's model registry
    does (its alias moves only by an explicit act): here ``leanserve promote``, ``canary`` or ``import
    --serve``. Registering is not deploying, and a guarded ``canary`` of an import is only possible when
    the import did not take all traffic first. ``serve`` moves all traffic to each new import, the way
    TF Serving's default ``latest`` policy and a KServe revision without ``canaryTrafficPercent`` do,
    for pipelines that deploy by importing. A model's first version always serves. Derived versions
    (optimize, edge, learn, federate, mitigate) are registered whatever this says.
    """

    on_import: str = "register"

    def __post_init__(self) -> None:
        _check(self.on_import in IMPORT_POLICIES, "lifecycle.on_import",
               f"expected {' or '.join(IMPORT_POLICIES)}, got {self.on_import!r}")


@dataclass(frozen=True)
class RolloutConfig:
    """A guarded canary: ``canary`` gets ``steps`` percent of traffic in turn. Each step needs a minimum
    sample and ``step_interval_s``; the canary advances only when every judged metric is shown, with
    ``confidence``, to be no worse than the primary's beyond its margin, and is rolled back as soon as
    one is shown, with the same confidence, to be worse beyond it. Otherwise it holds.

    Defaults were chosen with ``benchmarks/rollout_bench.py`` (tuning seeds disjoint from its reporting
    seeds): an identical canary is promoted and a 3-point-worse one rolled back in at least 19 of 20.
    """

    canary: int | None = None
    primary: int | None = None
    steps: tuple[int, ...] = (5, 25, 50, 100)
    stage: int = 0
    step_interval_s: float = 60.0
    # canary requests in a step before its error rate and latency are judged (the primary needs as many
    # in the rollout); a floor, since proving a zero error rate within 1 point takes ~270 by itself
    min_requests: int = 50
    # one-sided confidence of every test: a rollback or an advance is each wrong at most ~5% of the time
    # at one look; the margins below and the minimum samples keep repeated looks from inflating it much
    confidence: float = 0.95
    max_error_rate_increase: float = 0.01  # margin: allowed canary error rate minus primary's (fraction)
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 2.0  # small windows are noisy: also allow this much absolute excess
    max_quality_drop: float = 0.015  # margin: allowed primary accuracy minus canary's (fraction)
    # labelled canary samples (cumulative over the rollout) before accuracy is judged; below it the
    # normal approximation behind the interval is poor and one wrong answer moves accuracy by >1 point
    min_quality_samples: int = 100
    min_shadow_agreement: float | None = 0.95  # when the canary also ran as the primary's shadow

    def __post_init__(self) -> None:
        for name in ("canary", "primary"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 1), f"rollout.{name}", f"expected a version number, got {value!r}")
        _check(isinstance(self.steps, (tuple, list)) and bool(self.steps) and all(_is_int(p) and 0 < p <= 100 for p in self.steps)
               and list(self.steps) == sorted(self.steps), "rollout.steps", f"expected increasing percentages between 1 and 100, got {self.steps!r}")
        _check(_is_int(self.stage) and 0 <= self.stage < len(self.steps), "rollout.stage",
               f"expected a step index from 0 to {len(self.steps) - 1}, got {self.stage!r}")
        _check_number(self.step_interval_s, "rollout.step_interval_s", "a positive number of seconds", above=0)
        _check(_is_int(self.min_requests) and self.min_requests >= 1, "rollout.min_requests", f"expected a positive integer, got {self.min_requests!r}")
        _check(_is_int(self.min_quality_samples) and self.min_quality_samples >= 1, "rollout.min_quality_samples",
               f"expected a positive integer, got {self.min_quality_samples!r}")
        _check_number(self.confidence, "rollout.confidence", "a probability from 0.5 to 0.999", at_least=0.5, at_most=0.999)
        _check_number(self.max_error_rate_increase, "rollout.max_error_rate_increase", "a fraction from 0 to 1", at_least=0, at_most=1)
        _check_number(self.max_quality_drop, "rollout.max_quality_drop", "a fraction from 0 to 1", at_least=0, at_most=1)
        _check_number(self.max_p99_ratio, "rollout.max_p99_ratio", "a ratio of at least 1", at_least=1)
        _check_number(self.p99_slack_ms, "rollout.p99_slack_ms", "a non-negative number of milliseconds", at_least=0)
        if self.min_shadow_agreement is not None:
            _check_number(self.min_shadow_agreement, "rollout.min_shadow_agreement", "a fraction from 0 to 1 or null", at_least=0, at_most=1)

    @property
    def active(self) -> bool:
        return self.canary is not None and self.primary is not None


def _check_number(value: Any, where: str, expected: str, *, above: float | None = None,
                  at_least: float | None = None, at_most: float | None = None) -> None:
    """Raise InvalidInput naming ``where`` unless ``value`` is a finite real number within the bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    _check(ok, where, f"expected {expected}, got {value!r}")


@dataclass(frozen=True)
class AlertConfig:
    """Alert rules of a model; ``None`` switches a rule off. Fired alerts go to the log, to the
    ``leanserve_alerts`` metrics and, when ``webhook_url`` is set, to that URL as JSON."""

    max_p99_ms: float | None = None
    max_error_rate: float | None = 0.05
    min_accuracy: float | None = None
    max_bias_gap: float | None = 0.1
    # fairness gaps (leanserve[fairness]). Demographic parity is off by default: groups whose base rates
    # differ legitimately get different selection rates; equalized odds compares like with like.
    max_demographic_parity_difference: float | None = None
    max_equalized_odds_difference: float | None = 0.2
    min_shadow_agreement: float | None = 0.9
    on_drift: bool = True
    webhook_url: str | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.webhook_url is None or str(self.webhook_url).startswith(("http://", "https://")),
               "alerts.webhook_url", "expected an http(s) URL")
        _check(self.window_s > 0, "alerts.window_s", "expected a positive number of seconds")


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model that is not per version, stored as the model's ``config.json``."""

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    allow_nonfinite: bool = True
    warmup: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "config") -> ModelConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        parts = {
            "version_policy": VersionPolicy,
            "runtime": RuntimeOptions,
            "batching": BatchingConfig,
            "cache": CacheConfig,
            "traffic": TrafficConfig,
            "rollout": RolloutConfig,
            "alerts": AlertConfig,
            "lifecycle": LifecycleConfig,
        }
        kwargs: dict[str, Any] = {k: from_dict(c, data.get(k), f"{where}.{k}") for k, c in parts.items()}
        for flag in ("allow_nonfinite", "warmup"):
            if flag in data:
                _check(isinstance(data[flag], bool), f"{where}.{flag}", "expected true or false")
                kwargs[flag] = data[flag]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExplainConfig:
    """How the server explains (``leanserve serve`` settings, read by ``explain/``). Durations carry their unit
    in the name."""

    workers: int = 1  # explanation threads
    max_queue: int = 4  # explanations admitted beyond those running; more get 503 + Retry-After
    timeout_ms: float = 5000.0  # default and largest per-request budget (queue wait included)
    engine_threads: int = 1  # intra-op threads of explanation sessions (ONNX Runtime) and of PyTorch (process-wide)
    shap_max_evals: int = 500  # SHAP model evaluations per row (explain_permutations sets the permutation explainer's)
    max_permutations: int = 32
    ig_steps: int = 50
    background_rows: int = 32  # rows of the reference profile used as SHAP's background
    max_tokens: int = 256  # tokens explained per row; longer rows get 400 (cost grows with the length squared)
    # Live importance sampling (background work that competes with serving, so off by default): explain one
    # request per version at most this often, within ``sample_cpu_share`` of one core. None: off.
    sample_interval_s: float | None = None
    sample_cpu_share: float = 0.05
    reference_samples: int = 20  # explanations that fix a version's reference importance
    window_samples: int = 50  # latest explanations compared with the reference
    drift_threshold: float = 0.2  # total variation distance above which attributions have drifted
    retry_after_s: float = 1.0
    preload: bool = False  # import SHAP/Captum and compile SHAP's kernels at start (seconds), not at the first explanation

    def __post_init__(self) -> None:
        for name in ("workers", "shap_max_evals", "max_permutations", "ig_steps", "background_rows", "max_tokens",
                     "reference_samples", "window_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidInput(f"explain.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0 or self.engine_threads < 0 or self.timeout_ms <= 0:
            raise InvalidInput("explain.max_queue and explain.engine_threads must be >= 0 and explain.timeout_ms > 0")
        if self.sample_interval_s is not None:
            _check_number(self.sample_interval_s, "explain.sample_interval_s", "seconds >= 0 (or null: off)", at_least=0)
        _check_number(self.sample_cpu_share, "explain.sample_cpu_share", "a share of one core in (0, 1]", above=0, at_most=1)
