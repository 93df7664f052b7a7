"""The Flower app of a real federation: the ``ServerApp`` and ``ClientApp`` that Flower's own processes load,
and the job folder through which ``leanserve federate --listen`` talks to its ServerApp.

Flower runs a deployed app in processes of its own: the SuperLink starts ``flwr-serverapp``, each SuperNode
starts ``flwr-clientapp``, and both import the components named in the app project's ``pyproject.toml``
(``write_app_project``): ``server_app`` and ``client_app`` below. The ServerApp cannot be handed Python
objects, so the leanserve process writes a job folder (``write_job``: the model's TorchScript, the held-out
data, the round settings) whose path is the app's ``job-dir`` config, and the ServerApp writes the outcome
back into it (``write_outcome``; ``read_outcome``). No pickle crosses: JSON, ``.npz`` and TorchScript.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp import ServerApp

from leanserve.errors import LeanserveError
from leanserve.learn.federated.client import build_client_app, node_data_path
from leanserve.learn.federated.server import Dropped, RoundSettings, RoundsOutcome

log = logging.getLogger(__name__)

JOB_DIR_KEY = "job-dir"
APP_NAME = "leanserve-federation"
_JOB, _MODEL, _EVAL = "job.json", "model.pt", "eval.npz"
_OUTCOME, _WEIGHTS = "outcome.json", "weights.npz"


@dataclass(frozen=True)
class Job:
    """What the ServerApp runs: the round settings, the model's input name, and how long to wait for
    ``settings.clients`` SuperNodes to connect before giving up."""

    settings: RoundSettings
    input_name: str
    join_timeout_s: float


def write_job(folder: Path, job: Job, module, eval_x: np.ndarray, eval_y: np.ndarray) -> None:
    """Write ``job``, ``module`` (TorchScript) and the held-out data the ServerApp evaluates on into ``folder``."""
    import torch

    torch.jit.save(module, str(folder / _MODEL))
    np.savez(folder / _EVAL, x=eval_x, labels=eval_y)
    (folder / _JOB).write_text(json.dumps({"settings": asdict(job.settings), "input_name": job.input_name,
                                           "join_timeout_s": job.join_timeout_s}))


def read_job(folder: Path):
    """(Job, TorchScript module, eval inputs, eval labels) from a folder written by ``write_job``."""
    import torch

    raw = json.loads((folder / _JOB).read_text())
    job = Job(RoundSettings(**raw["settings"]), raw["input_name"], float(raw["join_timeout_s"]))
    with np.load(folder / _EVAL, allow_pickle=False) as data:
        x, y = data["x"], data["labels"]
    return job, torch.jit.load(str(folder / _MODEL)), x, y


def write_outcome(folder: Path, outcome: RoundsOutcome | None = None, error: str | None = None) -> None:
    """Record the rounds' outcome (weights in ``.npz``, the rest in JSON), or the ``error`` that stopped them."""
    if outcome is not None:
        np.savez(folder / _WEIGHTS, **{k: v.detach().cpu().numpy() for k, v in outcome.state_dict.items()})
    record = {"error": error} if error else {"accuracy": outcome.accuracy, "loss": outcome.loss,
                                              "dropped": [asdict(d) for d in outcome.dropped],
                                              "failed_rounds": outcome.failed_rounds}
    # Written last and renamed into place: the outcome file's presence means the weights are complete.
    partial = folder / (_OUTCOME + ".partial")
    partial.write_text(json.dumps(record))
    partial.replace(folder / _OUTCOME)


def read_outcome(folder: Path) -> RoundsOutcome:
    """The RoundsOutcome the ServerApp recorded. Raises LeanserveError with the ServerApp's error, or when it
    recorded nothing (it failed before the end; its log says why)."""
    import torch

    path = folder / _OUTCOME
    if not path.is_file():
        raise LeanserveError("the federation's ServerApp ended without an outcome (see its log above)")
    record = json.loads(path.read_text())
    if record.get("error"):
        raise LeanserveError(record["error"])
    with np.load(folder / _WEIGHTS, allow_pickle=False) as weights:
        state = {k: torch.from_numpy(weights[k]) for k in weights.files}
    return RoundsOutcome(state_dict=state, accuracy=record["accuracy"], loss=record["loss"],
                         dropped=[Dropped(**d) for d in record["dropped"]], failed_rounds=record["failed_rounds"])


def write_app_project(folder: Path, job_dir: Path) -> Path:
    """A Flower app project in ``folder`` whose components are this module's, with ``job_dir`` as its job.
    No dependencies are declared: every SuperNode runs leanserve already, and Flower installs nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""\
[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "leanserve federated rounds"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "leanserve"

[tool.flwr.app.components]
serverapp = "{__name__}:server_app"
clientapp = "{__name__}:client_app"

[tool.flwr.app.config]
{JOB_DIR_KEY} = {json.dumps(str(job_dir))}
""")
    return folder


def wait_for_clients(grid, wanted: int, timeout_s: float, poll_s: float = 0.5) -> int:
    """How many SuperNodes are connected once ``wanted`` are, or when ``timeout_s`` has passed."""
    deadline, joined = time.monotonic() + timeout_s, -1
    while True:
        count = len(list(grid.get_node_ids()))
        if count != joined:
            log.info("%d of %d clients connected", count, wanted)
            joined = count
        if count >= wanted or time.monotonic() >= deadline:
            return count
        time.sleep(poll_s)


server_app = ServerApp()


@server_app.main()
def _main(grid, context) -> None:
    from leanserve.learn.federated.server import run_rounds

    handler = logging.StreamHandler()  # flwr-serverapp forwards this process's stderr to the run's log
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("leanserve").addHandler(handler)
    logging.getLogger("leanserve").setLevel(logging.INFO)
    folder = Path(str(context.run_config[JOB_DIR_KEY]))
    job, module, x, y = read_job(folder)
    joined = wait_for_clients(grid, job.settings.clients, job.join_timeout_s)
    if joined < job.settings.clients:
        write_outcome(folder, error=f"only {joined} of {job.settings.clients} clients joined within "
                                    f"{job.join_timeout_s:g} s; nothing trained or registered")
        return
    write_outcome(folder, run_rounds(grid, module, job.input_name, x, y, job.settings))


client_app = build_client_app(node_data_path)
