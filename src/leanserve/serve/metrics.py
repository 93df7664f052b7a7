"""Prometheus metrics of the server, labelled by model and version (prometheus-client)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric the server exports, in its own registry (so tests can run several servers)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("model", "version")
        self.requests = Counter("leanserve_requests", "Inference requests by outcome", (*labels, "protocol", "outcome"), registry=r)
        self.request_seconds = Histogram("leanserve_request_seconds", "Request latency in the data plane (queue + compute)", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("leanserve_queue_seconds", "Time a request waited in the batch queue", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("leanserve_compute_seconds", "Engine time per batch", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("leanserve_batch_size", "Rows per executed batch", labels, buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("leanserve_queue_depth", "Requests waiting in the batch queue", labels, registry=r)
        self.in_flight = Gauge("leanserve_in_flight_requests", "Requests being served", labels, registry=r)
        self.cache = Counter("leanserve_cache", "Response cache lookups", (*labels, "result"), registry=r)
        self.shadow = Counter("leanserve_shadow_comparisons", "Shadow outputs compared with the primary", ("model", "primary", "shadow", "result"), registry=r)
        self.shadow_agreement = Gauge("leanserve_shadow_agreement_ratio", "Share of shadow comparisons that agreed", ("model", "primary", "shadow"), registry=r)
        self.loaded = Gauge("leanserve_model_loaded", "1 when a version is loaded and ready", labels, registry=r)
        self.load_failures = Counter("leanserve_model_load_failures", "Versions that failed to load", labels, registry=r)
        self.quality = Gauge("leanserve_live_quality", "Rolling quality from delayed labels (accuracy or mae)", (*labels, "metric"), registry=r)
        self.labelled = Gauge("leanserve_labelled_samples", "Labelled samples behind leanserve_live_quality", labels, registry=r)
        self.feedback = Counter("leanserve_feedback", "Feedback labels by outcome", ("model", "outcome"), registry=r)
        self.log_samples = Gauge("leanserve_prediction_log_samples", "Prediction log samples by fate", ("fate",), registry=r)
        self.drift = Gauge("leanserve_drift_detected", "1 when live traffic drifted from the version's reference profile", labels, registry=r)
        self.alerts = Counter("leanserve_alerts", "Alerts fired", ("model", "rule"), registry=r)
        self.alerts_active = Gauge("leanserve_alert_active", "1 while an alert holds", (*labels, "rule"), registry=r)
        self.rollbacks = Counter("leanserve_rollout_rollbacks", "Canaries rolled back by the rollout guard", ("model",), registry=r)
        # fairness (leanserve[fairness]): per-group rates and their largest gaps, from delayed labels
        self.fairness_gap = Gauge("leanserve_fairness_gap", "Largest gap between groups from delayed labels "
                                  "(demographic_parity_difference, equalized_odds_difference)", (*labels, "metric"), registry=r)
        self.group_rate = Gauge("leanserve_group_rate", "Per-group rate from delayed labels (selection_rate, "
                                "true_positive_rate, false_positive_rate, accuracy)", (*labels, "group", "metric"), registry=r)
        self.rejected = Counter("leanserve_rejected_requests", "Requests refused before the model (overload, timeout)", (*labels, "reason"), registry=r)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        """The metric children of one version, looked up once instead of per request."""
        labels = (model, str(version))
        bound = VersionMetrics(
            request_seconds=self.request_seconds.labels(*labels),
            queue_seconds=self.queue_seconds.labels(*labels),
            compute_seconds=self.compute_seconds.labels(*labels),
            batch_size=self.batch_size.labels(*labels),
            queue_depth=self.queue_depth.labels(*labels),
            in_flight=self.in_flight.labels(*labels),
            cache_hit=self.cache.labels(*labels, "hit"),
            cache_miss=self.cache.labels(*labels, "miss"),
            overloaded=self.rejected.labels(*labels, "overloaded"),
            shed_queued=self.rejected.labels(*labels, "queue_wait"),
            timed_out=self.rejected.labels(*labels, "timeout"),
            _requests=self.requests, _labels=labels,
        )
        self.bind_in_flight(bound)
        return bound

    def bind_in_flight(self, version: VersionMetrics) -> None:
        """Export ``version.in_flight_count`` (a plain counter the data plane keeps) as the in-flight gauge,
        read when scraped instead of updated twice per request."""
        self.in_flight.labels(*version._labels).set_function(lambda: version.in_flight_count[0])


@dataclass(frozen=True)
class VersionMetrics:
    """Pre-bound metric children for one model version."""

    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    in_flight: Gauge  # set from in_flight_count when scraped
    cache_hit: Counter
    cache_miss: Counter
    overloaded: Counter  # refused on arrival, before the body was read
    shed_queued: Counter  # admitted and decoded, then dropped from the queue's head for waiting too long
    timed_out: Counter
    _requests: Counter
    _labels: tuple[str, str]
    _outcomes: dict = field(default_factory=dict)
    in_flight_count: list = field(default_factory=lambda: [0])  # requests being served, a one-item box

    def outcome(self, protocol: str, outcome: str) -> Counter:
        """The request counter child of one protocol and outcome (bound once, then a dict lookup)."""
        child = self._outcomes.get((protocol, outcome))
        if child is None:
            child = self._outcomes[(protocol, outcome)] = self._requests.labels(*self._labels, protocol, outcome)
        return child
