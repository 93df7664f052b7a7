"""The client side of a federated round: a Flower ``ClientApp`` that trains the global model on local data.

Clients need no model code: each training message carries the model's TorchScript (the version's PyTorch
source) beside the global weights, and the training settings (``local-epochs``, ``lr``, ``batch-size``,
and FedProx's ``proximal-mu``). A client trains with SGD, adding FedProx's proximal term
(mu/2)·||w − w_global||² when mu > 0, and replies with its weights and ``num-examples`` (FedAvg's weight).
Local data is an ``.npz`` with the model's input array and ``labels``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leanserve.errors import InvalidInput

MODEL_KEY = "model-torchscript"
INPUT_KEY = "input-name"
DATA_PATH_KEY = "data-path"  # the SuperNode's --node-config key naming its data file


def load_client_data(path: str | Path, input_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs as float32, labels as int64) from an ``.npz`` holding ``labels`` and the model's input
    (``input_name``, or its only other array). Raises InvalidInput naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such data file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{path}: not a readable .npz file ({exc})") from None
    if not hasattr(archive, "files"):
        raise InvalidInput(f"{path}: a single array, not an .npz holding the model input and 'labels'")
    with archive as data:
        if "labels" not in data.files:
            raise InvalidInput(f"{path}: needs a 'labels' array (has {', '.join(data.files)})")
        others = [k for k in data.files if k != "labels"]
        key = input_name if input_name in data.files else (others[0] if len(others) == 1 else None)
        if key is None:
            wanted = repr(input_name) if input_name else "array beside 'labels'"
            raise InvalidInput(f"{path}: needs the model input {wanted} (has {', '.join(data.files)})")
        x, y = data[key].astype(np.float32), data["labels"].astype(np.int64)
    if len(x) != len(y) or len(y) == 0:
        raise InvalidInput(f"{path}: {len(x)} inputs but {len(y)} labels")
    return x, y


def train_locally(module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int,
                  proximal_mu: float = 0.0, seed: int = 0) -> float:
    """Train ``module`` in place with SGD (momentum 0.9) for ``epochs`` passes; with ``proximal_mu`` > 0 the
    loss adds (mu/2)·||w − w_start||² (FedProx). Returns the mean loss of the last epoch (may be NaN)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    anchor = [p.detach().clone() for p in module.parameters()]
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        order, total = torch.randperm(len(inputs)), 0.0
        for start in range(0, len(inputs), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(module(inputs[idx]), labels[idx])
            if proximal_mu > 0:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchor))
                loss = loss + proximal_mu / 2 * drift
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        mean_loss = total / len(inputs)
    module.eval()
    return mean_loss


def build_client_app(data_path: Callable[[object], Path]):
    """A Flower ``ClientApp`` whose train handler reads its data from ``data_path(context)``: the partition
    file in a simulation, the ``data-path`` node config on a real SuperNode."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        import torch

        torch.set_num_threads(1)  # many clients share the machine in a simulation
        config = msg.content["config"]
        module = torch.jit.load(io.BytesIO(config[MODEL_KEY]))
        module.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = load_client_data(data_path(context), str(config[INPUT_KEY]))
        loss = train_locally(module, x, y, epochs=int(config["local-epochs"]), lr=float(config["lr"]),
                             batch_size=int(config["batch-size"]), proximal_mu=float(config.get("proximal-mu", 0.0)),
                             seed=int(config["server-round"]))
        metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
        return Message(RecordDict({"arrays": ArrayRecord(module.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


def node_data_path(context) -> Path:
    """The data file a real SuperNode was started with (``--node-config "data-path='FILE'"``)."""
    path = context.node_config.get(DATA_PATH_KEY)
    if not path:
        raise InvalidInput(f"this SuperNode has no {DATA_PATH_KEY!r} node config; start it with "
                           "`leanserve federate-client --data FILE`")
    return Path(str(path))
