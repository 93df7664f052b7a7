"""Federated learning with Flower: a repository version trained by clients that keep their data, the
result registered as a new version that enters as a guarded canary.

The global model is the version's PyTorch source (``torch_source.load_source``). Flower runs the rounds:
FedAvg or FedProx with server momentum (its FedAvgM), optionally inside its server-side DP clipping
wrapper, behind ``ScreenedStrategy`` (bad updates are dropped with a reason). After every round the server
evaluates the aggregate on held-out data. At the end ``register_federated`` exports the model to ONNX,
registers it with its provenance (rounds, clients, strategy, DP settings, per-round accuracy, dropped updates) and the
source attached, and starts a guarded canary against the serving version.

``federate`` runs everything on one machine with Flower's simulation engine (Ray): K virtual clients
over partitions of one data set. Flower's ``run_simulation`` is deprecated in favour of ``flwr run``, which
needs an app project and a SuperLink; for an in-process API call it is still the direct route.
``federate_deployed`` runs the same rounds with real clients: a Flower SuperLink and ``flwr run`` of
leanserve's Flower app (``deploy``, ``app``), SuperNodes joining with
``leanserve federate-client``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from leanserve.artifact import Provenance
from leanserve.errors import InvalidInput, LeanserveError
from leanserve.learn.federated.server import Dropped, RoundSettings, RoundsOutcome
from leanserve.learn.partition import Partitioner, iid
from leanserve.repository import Repository, VersionRef

log = logging.getLogger(__name__)
STRATEGIES = ("fedavg", "fedprox")


def parse_dp(text: str) -> tuple[float, float]:
    """``CLIP,NOISE`` (clipping norm > 0, noise multiplier >= 0) as two floats; InvalidInput otherwise."""
    clip, sep, noise = text.partition(",")
    try:
        values = float(clip), float(noise)
    except ValueError:
        values = None
    if not sep or values is None or not values[0] > 0 or not values[1] >= 0:
        raise InvalidInput(f"--dp {text!r}: expected CLIP,NOISE with a clipping norm > 0 and a noise multiplier >= 0, "
                           "e.g. --dp 1.0,0.5")
    return values


def check_settings(settings: RoundSettings) -> RoundSettings:
    """``settings`` if every knob is usable; InvalidInput naming the first that is not."""
    if settings.strategy not in STRATEGIES:
        raise InvalidInput(f"strategy {settings.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if settings.rounds < 1 or settings.clients < 1 or settings.local_epochs < 1 or settings.batch_size < 1:
        raise InvalidInput("rounds, clients, local epochs and batch size must be at least 1")
    if not 0 < settings.min_fraction <= 1:
        raise InvalidInput(f"min_fraction {settings.min_fraction}: must be in (0, 1]")
    if settings.lr <= 0 or settings.proximal_mu < 0:
        raise InvalidInput("lr must be > 0 and proximal_mu >= 0")
    if not 0 <= settings.server_momentum < 1 or settings.server_lr <= 0:
        raise InvalidInput(f"server momentum {settings.server_momentum}: must be in [0, 1); server lr must be > 0")
    return settings


@dataclass(frozen=True)
class FederatedResult:
    """A finished federation: the registered version (None when not registered), accuracy before training
    and after each round, and the updates left out."""

    ref: VersionRef | None
    parent: VersionRef
    accuracy: list[float]
    dropped: list[Dropped] = field(default_factory=list)
    failed_rounds: list[int] = field(default_factory=list)
    canary: bool = False


@dataclass(frozen=True)
class TrainingData:
    """Labelled data for a federation: ``x`` is the model's one input, ``y`` integer class labels."""

    input_name: str
    x: np.ndarray
    y: np.ndarray

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[TrainingData, TrainingData]:
        """(training pool, held-out evaluation set), the evaluation rows drawn at random."""
        order = np.random.default_rng(seed).permutation(len(self.y))
        cut = max(1, int(round(len(order) * eval_fraction)))
        held, pool = np.sort(order[:cut]), np.sort(order[cut:])
        return (TrainingData(self.input_name, self.x[pool], self.y[pool]),
                TrainingData(self.input_name, self.x[held], self.y[held]))


def load_training_data(path: str | Path, input_name: str) -> TrainingData:
    """An ``.npz`` with the model input and ``labels`` as TrainingData; InvalidInput when either is missing."""
    from leanserve.learn.federated.client import load_client_data

    x, y = load_client_data(path, input_name)
    return TrainingData(input_name, x, y)


def single_input_name(repo: Repository, ref: VersionRef) -> str:
    """The name of the version's one input; InvalidInput for a model with several inputs."""
    inputs = repo.get(ref.name, ref.version).manifest.signature.inputs
    if len(inputs) != 1:
        raise InvalidInput(f"{ref} has {len(inputs)} inputs; federated learning supports single-input classifiers")
    return inputs[0].name


def federate(repo: Repository, name: str, settings: RoundSettings, data: TrainingData, *, version: int | None = None,
             partition: Partitioner = iid, eval_fraction: float = 0.2, seed: int = 0, register: bool = True,
             canary: bool = True, client_app=None, force: bool = False) -> FederatedResult:
    """Simulate ``settings.clients`` clients on this machine, each holding one ``partition`` of ``data`` less a
    held-out ``eval_fraction`` the server evaluates on, and run the rounds with Flower's simulation engine.
    With ``register``, the result becomes a new version (a guarded canary when ``canary``), subject to
    ``register_federated``'s checks (``force`` registers a result worse than its start, never a collapse).
    Raises UnsupportedFormat when the version has no PyTorch source, InvalidInput for bad settings or data,
    LeanserveError when no round completed (nothing is registered then)."""
    from leanserve.torch_source import load_source

    check_settings(settings)
    parent = repo.resolve(name, version)
    module = load_source(repo.get(parent.name, parent.version))
    pool, held_out = data.split(eval_fraction, seed)
    parts = partition(pool.y, settings.clients, seed)
    if any(len(p) == 0 for p in parts):
        raise InvalidInput(f"{len(pool.y)} training rows cannot be shared among {settings.clients} clients")
    with tempfile.TemporaryDirectory(prefix="leanserve-federate-") as tmp:
        files = _write_partitions(pool, parts, Path(tmp))
        outcome = _simulate(module, files, held_out, settings, client_app)
    if not register:
        return FederatedResult(None, parent, outcome.accuracy, outcome.dropped, outcome.failed_rounds)
    return register_federated(repo, parent, module, outcome, settings, data.x[:2], canary=canary, held_out=held_out,
                              force=force)


def federate_deployed(repo: Repository, name: str, settings: RoundSettings, held_out: TrainingData, listen: str, *,
                      version: int | None = None, join_timeout_s: float = 300.0, register: bool = True,
                      canary: bool = True, tls=None, authorized_keys=None, force: bool = False) -> FederatedResult:
    """Run the rounds with real clients: Flower's Fleet API is served on ``listen`` (HOST:PORT; in TLS with
    ``tls``, a ``proxy.TlsFiles``) in front of a SuperLink no one else can reach, which waits up to
    ``join_timeout_s`` for ``settings.clients`` SuperNodes (``leanserve federate-client``; with
    ``authorized_keys``, a ``keys.AuthorizedKeys``, only those holding one of its keys), and the server
    evaluates every aggregate on ``held_out``. Registers the result as ``federate`` does. Every Flower
    process is stopped before this returns or raises. Raises InvalidInput for bad settings or an unusable
    address, LeanserveError when too few clients joined, the run failed or no round completed (nothing is
    registered then)."""
    from leanserve.learn.federated.app import Job, read_outcome, write_job
    from leanserve.learn.federated.deploy import run_federation
    from leanserve.torch_source import load_source

    check_settings(settings)
    if not join_timeout_s > 0:
        raise InvalidInput(f"join timeout {join_timeout_s}: must be > 0 seconds")
    if authorized_keys is not None and len(authorized_keys.keys) < settings.clients:
        raise InvalidInput(f"--clients {settings.clients}: --authorized-keys {authorized_keys.path} admits only "
                           f"{len(authorized_keys.keys)} SuperNode(s), so the rounds could never start")
    parent = repo.resolve(name, version)
    module = load_source(repo.get(parent.name, parent.version))
    with tempfile.TemporaryDirectory(prefix="leanserve-federate-") as tmp:
        job_dir = Path(tmp)
        write_job(job_dir, Job(settings, held_out.input_name, join_timeout_s), module, held_out.x, held_out.y)
        run_federation(listen, job_dir, tls=tls, authorized_keys=authorized_keys)
        outcome = read_outcome(job_dir)
    if not register:
        return FederatedResult(None, parent, outcome.accuracy, outcome.dropped, outcome.failed_rounds)
    return register_federated(repo, parent, module, outcome, settings, held_out.x[:2], canary=canary,
                              where="deployment", held_out=held_out, force=force)


def _write_partitions(pool: TrainingData, parts: list[np.ndarray], folder: Path) -> list[Path]:
    files = []
    for client, idx in enumerate(parts):
        path = folder / f"client-{client}.npz"
        np.savez(path, **{pool.input_name: pool.x[idx], "labels": pool.y[idx]})
        files.append(path)
    return files


def _simulate(module, files: list[Path], held_out: TrainingData, settings: RoundSettings, client_app) -> RoundsOutcome:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from leanserve.learn.federated.client import build_client_app
    from leanserve.learn.federated.server import run_rounds

    outcomes: list[RoundsOutcome] = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        outcomes.append(run_rounds(grid, module, held_out.input_name, held_out.x, held_out.y, settings))

    paths = [str(f) for f in files]
    client = client_app or build_client_app(lambda context: Path(paths[int(context.node_config["partition-id"])]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": logging.WARNING,
                             # the actors' own output (library warnings, e.g. torch.jit's) only when asked for (-v)
                             "log_to_driver": logging.getLogger("leanserve").isEnabledFor(logging.INFO)}}
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=settings.clients, backend_config=backend)
    finally:
        _stop_ray()
    if not outcomes:
        raise LeanserveError("the federated simulation ended without finishing its rounds (see Flower's log above)")
    return outcomes[0]


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def register_federated(repo: Repository, parent: VersionRef, module, outcome: RoundsOutcome, settings: RoundSettings,
                       example: np.ndarray, *, canary: bool = True, where: str = "simulation",
                       held_out: TrainingData | None = None, force: bool = False) -> FederatedResult:
    """Load the final weights into ``module``, export it to ONNX (checked against PyTorch), register it as the
    next version of ``parent.name`` with its provenance and PyTorch source, and start a guarded canary.

    Before registering, the result is judged on the server's held-out figures (``outcome.accuracy``: the
    start, then each round; ``held_out`` rows for the predictions): a collapse (non-finite weights, one
    class for every held-out row, accuracy at or below chance) raises ``derived.Collapsed`` whatever
    ``force`` says; a final accuracy below the start raises ``derived.WorseThanParent`` unless ``force``.
    Raises LeanserveError when no round completed; the repository is unchanged whenever it raises."""
    import torch

    from leanserve.from_torch import export
    from leanserve.traffic import start_rollout
    from leanserve.torch_source import SOURCE_FILE

    completed = settings.rounds - len(outcome.failed_rounds)
    if completed < 1:
        raise LeanserveError(f"no federated round completed ({len(outcome.dropped)} updates dropped; first reason: "
                             f"{outcome.dropped[0].reason if outcome.dropped else 'none'}); nothing registered")
    module.load_state_dict(outcome.state_dict)
    module.eval()
    forced = _check_result(module, outcome, held_out, force)
    signature = repo.get(parent.name, parent.version).manifest.signature
    with tempfile.TemporaryDirectory(prefix="leanserve-federated-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        # A TorchScript module: the torch.export-based exporter cannot trace it, the TorchScript-based one can.
        exported = export(module, torch.from_numpy(np.ascontiguousarray(example)), onnx_path, exporter="torchscript",
                          input_names=[s.name for s in signature.inputs], output_names=[s.name for s in signature.outputs])
        source = Path(tmp) / SOURCE_FILE
        torch.jit.save(module, str(source))
        ref = repo.add(onnx_path, parent.name, attachments=[source], serve=False,  # canary or promote serves it
                       provenance=Provenance(source=f"leanserve federate ({where})", parent=str(parent),
                                             recipe=_recipe(settings, outcome), exporter=exported.exporter),
                       metrics=({"accuracy": outcome.accuracy[-1]} if outcome.accuracy else {})
                       | ({"registered_with_force": forced} if forced else {}) or None)
    started = False
    if canary:
        start_rollout(repo, ref.name, ref.version)
        started = True
    return FederatedResult(ref, parent, outcome.accuracy, outcome.dropped, outcome.failed_rounds, started)


def _check_result(module, outcome: RoundsOutcome, held_out: TrainingData | None, force: bool) -> str | None:
    """Refuse a collapsed aggregate always and one worse than the start unless ``force`` (see
    ``register_federated``); returns the warning of a forced registration."""
    import torch

    from leanserve.derived import HeldOut, check_not_collapsed, check_not_worse

    predictions = classes = None
    if held_out is not None and len(held_out.y):
        with torch.no_grad():
            logits = module(torch.from_numpy(np.ascontiguousarray(held_out.x)))
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        predictions, classes = logits.argmax(-1).numpy(), int(logits.shape[-1])
    final = outcome.accuracy[-1] if outcome.accuracy else None
    check_not_collapsed("the federated model", held_out_accuracy=final, classes=classes, predictions=predictions,
                        weights=module.state_dict().values())
    start = outcome.accuracy[0] if len(outcome.accuracy) > 1 else None
    figure = HeldOut("accuracy", start, final) if start is not None else None
    return check_not_worse(figure, force, f"the federated model after {len(outcome.accuracy) - 1} rounds")


def _recipe(settings: RoundSettings, outcome: RoundsOutcome) -> dict:
    dp = None if settings.dp_clip is None else {"clipping_norm": settings.dp_clip, "noise_multiplier": settings.dp_noise,
                                                 "mode": "server-side fixed clipping"}
    return {
        "kind": "federated", "framework": "flower", "strategy": settings.strategy, "rounds": settings.rounds,
        "clients": settings.clients, "local_epochs": settings.local_epochs, "lr": settings.lr,
        "batch_size": settings.batch_size, "proximal_mu": settings.proximal_mu if settings.strategy == "fedprox" else None,
        "server_momentum": settings.server_momentum, "server_lr": settings.server_lr,
        "dp": dp, "per_round_accuracy": [round(a, 4) for a in outcome.accuracy],
        "failed_rounds": outcome.failed_rounds, "dropped": [asdict(d) for d in outcome.dropped],
    }


def digits_training_data(input_name: str = "image") -> TrainingData:
    """scikit-learn's digits at the demo CNN's 1x28x28 (train and test splits together)."""
    from leanserve.demo import digits_dataset

    x_train, x_test, y_train, y_test = digits_dataset()
    return TrainingData(input_name, np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))


def digits_held_out(input_name: str = "image") -> TrainingData:
    """scikit-learn's digits test split at the demo CNN's 1x28x28: what a real federation's server evaluates
    on when given no data."""
    from leanserve.demo import digits_dataset

    _, x_test, _, y_test = digits_dataset()
    return TrainingData(input_name, x_test, y_test)


def with_dp(settings: RoundSettings, dp: str | None) -> RoundSettings:
    """``settings`` with DP from the CLI's ``CLIP,NOISE`` (unchanged when ``dp`` is None)."""
    if dp is None:
        return settings
    clip, noise = parse_dp(dp)
    return replace(settings, dp_clip=clip, dp_noise=noise)

