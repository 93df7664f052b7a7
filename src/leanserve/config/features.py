"""Settings of the features around serving: what registering a version does to traffic (lifecycle),
guarded canaries (rollout), alert rules, and explanations."""

from __future__ import annotations

from dataclasses import dataclass

from leanserve.config.parse import _check, _check_number, _is_int
from leanserve.errors import InvalidInput


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

    Defaults were chosen with ``benchmarks/rollout_bench.py`` on tuning seeds 0-19; on its reporting seeds
    1000-1019 (benchmarks/RESULTS.md, rollout_bench 2026-12-03) an identical canary was promoted and a
    3-point-worse one rolled back in 20 of 20 (goal: at least 19).
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
    # request per version at most this often; a sample that ran T seconds (wall time) holds the next back
    # T / ``sample_cpu_share`` seconds. None: off.
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
