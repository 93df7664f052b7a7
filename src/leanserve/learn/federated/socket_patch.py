"""Keeps a federation's SuperLink off the network: its one HTTP port becomes a Unix socket.

Flower 1.42's SuperLink serves its Control API (submit a run, i.e. code), its Runtime API (the ServerApp's)
and its Fleet API (the SuperNodes') on one TCP host:port, with no authentication on Control unless
Flower's enterprise add-on provides OIDC. Its server-side programs (``flower-superlink``,
``flower-superexec``, ``flwr-serverapp`` and the ``flwr`` CLI) accept only TCP addresses, so
``deploy`` starts each of them with ``install`` run first (a ``sitecustomize`` on their
PYTHONPATH) and the socket's path in ``SOCKET_ENV``: the SuperLink's uvicorn then binds that socket, in a
folder only this user can enter, and every httpx client of theirs connects to it whatever address it was
given. Nothing listens on TCP; ``proxy`` alone puts the Fleet API, and nothing else, on the
address the user chose.

Why a patch rather than a setting: Flower offers none (uvicorn's ``uds`` and httpx's ``HTTPTransport(uds=)``
exist, but Flower passes neither through), and a loopback port is reachable by every local user.
"""

from __future__ import annotations

import os

SOCKET_ENV = "LEANSERVE_FLOWER_SOCKET"


def sitecustomize_source() -> str:
    """The ``sitecustomize.py`` that makes a Flower process use the socket (run ``install`` at start-up)."""
    return f"from {__name__} import install\ninstall()\n"


def install() -> None:
    """In a Flower process started with ``SOCKET_ENV`` set: bind uvicorn servers to that Unix socket instead
    of host:port, and send every httpx request over it. Without ``SOCKET_ENV`` this does nothing."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    _bind_uvicorn_to(path)
    _connect_httpx_to(path)


def _bind_uvicorn_to(path: str) -> None:
    import uvicorn

    run = uvicorn.run

    def run_on_socket(app, **kwargs):
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        kwargs["uds"] = path
        return run(app, **kwargs)

    uvicorn.run = run_on_socket


def _connect_httpx_to(path: str) -> None:
    import httpx

    for client_class, transport_class in ((httpx.Client, httpx.HTTPTransport),
                                          (httpx.AsyncClient, httpx.AsyncHTTPTransport)):
        _patch_client(client_class, transport_class, path)


def _patch_client(client_class, transport_class, path: str) -> None:
    init = client_class.__init__

    def init_on_socket(self, *args, **kwargs):
        if kwargs.get("transport") is None:
            # A custom transport carries the TLS settings, so the client's own are handed to it.
            kwargs["transport"] = transport_class(uds=path, verify=kwargs.get("verify", True))
        init(self, *args, **kwargs)

    client_class.__init__ = init_on_socket
