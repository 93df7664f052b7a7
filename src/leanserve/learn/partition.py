"""Splitting one labelled data set among simulated clients: IID, Dirichlet label skew, or a few classes each.

Federated simulations need clients whose data differ the way real devices' data do. Each function takes
the integer labels and returns one index array per client; ``parse_partition`` reads the CLI's spelling
(``iid``, ``dirichlet:0.5``, ``classes:2``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from leanserve.errors import InvalidInput

Partitioner = Callable[[np.ndarray, int, int], list[np.ndarray]]


def iid(labels: np.ndarray, clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffled indices cut into ``clients`` nearly equal parts."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet(labels: np.ndarray, clients: int, seed: int = 0, alpha: float = 0.5, min_size: int = 10) -> list[np.ndarray]:
    """Each class split among clients in proportions drawn from Dirichlet(alpha): smaller alpha, more skew.
    Redrawn (up to 100 times) until every client holds at least ``min_size`` samples."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise InvalidInput(f"cannot give each of {clients} clients {min_size} samples with Dirichlet alpha {alpha}; "
                       "use fewer clients or a larger alpha")


def by_class(labels: np.ndarray, clients: int, seed: int = 0, classes_per_client: int = 2) -> list[np.ndarray]:
    """Each client holds only ``classes_per_client`` classes; each class is shared evenly by the clients that
    hold it. Classes are dealt round-robin over a seeded shuffle, so every class is held by someone."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(clients):
        for k in range(classes_per_client):
            holders[int(classes[(client * classes_per_client + k) % len(classes)])].append(client)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for owner, chunk in zip(owners, np.array_split(members, max(len(owners), 1))):
            parts[owner].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def parse_partition(text: str) -> Partitioner:
    """``iid``, ``dirichlet[:ALPHA]`` (default 0.5) or ``classes[:N]`` (default 2) as a partitioner."""
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "iid" and not arg:
            return iid
        if kind == "dirichlet":
            alpha = float(arg or 0.5)
            if alpha > 0:
                return lambda labels, clients, seed=0: dirichlet(labels, clients, seed, alpha=alpha)
        if kind == "classes":
            count = int(arg or 2)
            if count > 0:
                return lambda labels, clients, seed=0: by_class(labels, clients, seed, classes_per_client=count)
    except ValueError:
        pass
    raise InvalidInput(f"--partition {text!r}: expected iid, dirichlet:ALPHA (ALPHA > 0) or classes:N (N > 0)")
