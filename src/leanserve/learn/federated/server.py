"""The server side of federated rounds: Flower's strategy behind a screen for bad updates, and the
``ServerApp`` that runs the rounds and evaluates every aggregate on held-out data.

Flower's FedAvg averages whatever arrives: one NaN update poisons the model, and a wrong-shaped one
makes aggregation fail. Its DP wrappers refuse to aggregate a round with any failed client at all.
``ScreenedStrategy`` therefore sits outside them: it drops each failed, missing, wrong-shaped or
non-finite reply with a logged reason, and lets the round aggregate only when enough clients remain
(else the global model is kept and the round is recorded as failed).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.serverapp.strategy import FedAvgM, Strategy

from leanserve.learn.federated.client import INPUT_KEY, MODEL_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dropped:
    """A client reply left out of a round, and why."""

    round: int
    node: int
    reason: str


class ScreenedStrategy(Strategy):
    """Wraps a Flower strategy (FedAvg, FedProx, or a DP wrapper around one) and screens training replies
    before it aggregates them. Needs at least ``min_replies`` good replies for a round to count."""

    def __init__(self, inner: Strategy, min_replies: int, weight_key: str = "num-examples") -> None:
        self.inner = inner
        self.min_replies = max(1, min_replies)
        self.weight_key = weight_key
        self.dropped: list[Dropped] = []
        self.failed_rounds: list[int] = []
        self._global: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._sent_to: set[int] = set()

    def configure_train(self, server_round, arrays, config, grid):
        self._global = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in zip(arrays.keys(), arrays.to_numpy_ndarrays())}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent_to = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        kept = []
        for reply in replies:
            reason = self.rejection(reply)
            if reason:
                self._drop(server_round, reply.metadata.src_node_id, reason)
            else:
                kept.append(reply)
        for node in sorted(self._sent_to - {r.metadata.src_node_id for r in replies}):
            self._drop(server_round, node, "no reply before the round's timeout (disconnected or too slow)")
        if len(kept) < self.min_replies:
            log.warning("round %d: only %d of %d clients sent a usable update (need %d); keeping the global model",
                        server_round, len(kept), len(self._sent_to), self.min_replies)
            self.failed_rounds.append(server_round)
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def rejection(self, reply) -> str | None:
        """Why ``reply`` cannot be aggregated, or None when it can."""
        if reply.has_error():
            return f"the client failed: {reply.error.reason}"
        content = reply.content
        if len(content.array_records) != 1:
            return f"expected one model update, got {len(content.array_records)}"
        record = next(iter(content.array_records.values()))
        if set(record.keys()) != set(self._global):
            missing, extra = set(self._global) - set(record.keys()), set(record.keys()) - set(self._global)
            return f"update's parameters differ from the global model's (missing {sorted(missing)}, unexpected {sorted(extra)})"
        for key, array in zip(record.keys(), record.to_numpy_ndarrays()):
            shape, _ = self._global[key]
            if tuple(array.shape) != shape:
                return f"parameter {key!r} has shape {list(array.shape)}, the global model's is {list(shape)}"
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                return f"parameter {key!r} has NaN or infinite values"
        weight = next(iter(content.metric_records.values()), {}).get(self.weight_key) if content.metric_records else None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            return f"no positive {self.weight_key!r} metric (got {weight!r})"
        return None

    def _drop(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: dropped client %d: %s", server_round, node, reason)
        self.dropped.append(Dropped(server_round, int(node), reason))

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


class FedProxM(FedAvgM):
    """FedProx on the server side, which only tells clients its ``proximal-mu`` (as Flower's FedProx does),
    aggregating as Flower's FedAvgM: Flower has no FedProx with server momentum."""

    def __init__(self, proximal_mu: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.proximal_mu = proximal_mu

    def configure_train(self, server_round, arrays, config, grid):
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


@dataclass(frozen=True)
class RoundSettings:
    """What the server asks of each round. ``server_momentum``/``server_lr``: how the server applies each
    round's averaged update (Flower's FedAvgM, Hsu et al. 2019; 0 and 1 are plain averaging). Momentum is
    on by default. 0.9 was chosen on one run of benchmarks/federated_bench.py (seed 0, digits split two
    classes per client), where FedAvg came within 2 points of central training in fewer rounds with it
    than without; that run chose it, so its round counts are not quoted. The bench reports medians over
    reporting seeds from 100 on, appended to benchmarks/RESULTS.md. ``min_fraction``: share of the sampled clients whose
    updates must survive screening for the round to count. ``dp_clip``/``dp_noise``: server-side fixed
    clipping and the Gaussian noise multiplier (Flower's DP wrapper), off when None."""

    strategy: str = "fedavg"
    rounds: int = 20
    clients: int = 10
    local_epochs: int = 2
    lr: float = 0.02
    batch_size: int = 16
    proximal_mu: float = 0.01
    server_momentum: float = 0.9
    server_lr: float = 1.0
    dp_clip: float | None = None
    dp_noise: float | None = None
    min_fraction: float = 0.5
    timeout_s: float = 600.0


@dataclass
class RoundsOutcome:
    """What the rounds produced: final weights (a state dict), server-side accuracy per round (index 0:
    before training), and the screened-out replies and failed rounds."""

    state_dict: dict
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    failed_rounds: list[int] = field(default_factory=list)


def build_strategy(settings: RoundSettings) -> ScreenedStrategy:
    """FedAvg or FedProx with the server's momentum (Flower's FedAvgM), optionally inside Flower's server-side
    DP fixed clipping, behind the screen. All ``clients`` must be connected before a round starts, and all
    are sampled."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=settings.clients,
                  min_available_nodes=settings.clients, server_learning_rate=settings.server_lr,
                  server_momentum=settings.server_momentum)
    if settings.strategy == "fedavg":
        inner = FedAvgM(**common)
    elif settings.strategy == "fedprox":
        inner = FedProxM(proximal_mu=settings.proximal_mu, **common)
    else:
        raise ValueError(f"unknown strategy {settings.strategy!r}")
    if settings.dp_clip is not None:
        inner = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=settings.dp_noise or 0.0,
                                                           clipping_norm=settings.dp_clip,
                                                           num_sampled_clients=settings.clients)
    return ScreenedStrategy(inner, min_replies=math.ceil(settings.min_fraction * settings.clients))


def run_rounds(grid, module, input_name: str, eval_x: np.ndarray, eval_y: np.ndarray,
               settings: RoundSettings) -> RoundsOutcome:
    """Run ``settings.rounds`` rounds on ``grid`` from ``module``'s weights (a TorchScript module), evaluating
    each aggregate on (eval_x, eval_y). Call from a ``ServerApp``'s main."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    outcome = RoundsOutcome(state_dict={})

    def evaluate(server_round: int, arrays) -> MetricRecord:
        module.load_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = evaluate_module(module, eval_x, eval_y)
        outcome.accuracy.append(accuracy)
        outcome.loss.append(loss)
        log.info("round %d: held-out accuracy %.4f", server_round, accuracy)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = build_strategy(settings)
    train_config = ConfigRecord({MODEL_KEY: buffer.getvalue(), INPUT_KEY: input_name, "local-epochs": settings.local_epochs,
                                 "lr": settings.lr, "batch-size": settings.batch_size})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(module.state_dict()), num_rounds=settings.rounds,
                            timeout=settings.timeout_s, train_config=train_config, evaluate_fn=evaluate)
    outcome.state_dict = result.arrays.to_torch_state_dict() if len(result.arrays) else module.state_dict()
    outcome.dropped, outcome.failed_rounds = strategy.dropped, strategy.failed_rounds
    return outcome


def evaluate_module(module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of ``module`` on (x, y)."""
    import torch
    import torch.nn.functional as F

    module.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            inputs, labels = torch.from_numpy(x[start:start + batch_size]), torch.from_numpy(y[start:start + batch_size])
            logits = module(inputs)
            correct += int((logits.argmax(dim=1) == labels).sum())
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(y), total_loss / len(y)
