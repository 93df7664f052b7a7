"""Typed settings of explanations: how the server explains (``ExplainConfig``) and one explanation to
run (``ExplainPlan``), parsed and checked at the edge, then trusted by the service and its workers."""

from __future__ import annotations

from dataclasses import dataclass

from leanserve.errors import InvalidInput
from leanserve.explain.methods import Target


@dataclass(frozen=True)
class ExplainConfig:
    """How the server explains. Durations carry their unit in the name."""

    workers: int = 1  # explanation threads
    max_queue: int = 4  # explanations admitted beyond those running; more get 503 + Retry-After
    timeout_ms: float = 5000.0  # default and largest per-request budget (queue wait included)
    engine_threads: int = 1  # intra-op threads of explanation sessions (ONNX Runtime) and of PyTorch (process-wide)
    shap_max_evals: int = 500  # SHAP model evaluations per row when explain_permutations is not given
    max_permutations: int = 32
    ig_steps: int = 50
    background_rows: int = 32  # rows of the reference profile used as SHAP's background
    sample_interval_s: float | None = 10.0  # live importance: one request per version this often; None: off
    reference_samples: int = 20  # explanations that fix a version's reference importance
    window_samples: int = 50  # latest explanations compared with the reference
    drift_threshold: float = 0.2  # total variation distance above which attributions have drifted
    retry_after_s: float = 1.0
    preload: bool = False  # import SHAP/Captum and compile SHAP's kernels at start (seconds), not at the first explanation

    def __post_init__(self) -> None:
        for name in ("workers", "shap_max_evals", "max_permutations", "ig_steps", "background_rows",
                     "reference_samples", "window_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidInput(f"explain.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0 or self.engine_threads < 0 or self.timeout_ms <= 0:
            raise InvalidInput("explain.max_queue and explain.engine_threads must be >= 0 and explain.timeout_ms > 0")


@dataclass(frozen=True)
class ExplainPlan:
    """One explanation to run, parsed and checked before inference: method, tensors, budget."""

    method: str
    target: Target
    column: int | None  # explain_target
    timeout_ms: float
    permutations: int | None
    origin: str = "request"  # or "sample" (live importance)
