"""Server settings: one typed object, read from flags and the environment in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from leanserve.config import ExplainConfig
from leanserve.errors import InvalidInput

ADMIN_TOKEN_ENV = "LEANSERVE_ADMIN_TOKEN"
FEEDBACK_TOKEN_ENV = "LEANSERVE_FEEDBACK_TOKEN"


@dataclass(frozen=True)
class ServerConfig:
    """How ``leanserve serve`` runs. Sizes are bytes, durations carry their unit in the name."""

    repo: Path
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 8001  # None: no gRPC
    max_body_bytes: int = 64 * 1024 * 1024
    max_elements: int = 16 * 1024 * 1024  # per tensor
    body_timeout_s: float = 30.0  # a client must send its whole body within this
    max_large_bodies: int = 2  # bodies over 1 MiB read and parsed at once; more get 503 + Retry-After unread
    shed_hold_s: float = 1.0  # a shed request's 503 (or a refused large body's error) is sent after this long (x2 per refusal in a row on a connection, up to x4)
    # Connections (see serve/connections.py). A request's headers must arrive within header_timeout_s of
    # the connection opening or of the request's first byte; an idle keep-alive connection is closed
    # after keep_alive_timeout_s; beyond max_connections open at once, each new connection's request
    # is answered 503 + Retry-After and the connection closed.
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 4096
    poll_interval_s: float = 1.0  # how often the repository is checked for new/removed versions
    drain_timeout_s: float = 30.0  # graceful shutdown waits this long for in-flight requests
    admin_token: str | None = None  # None: admin API disabled
    admin_allow_remote: bool = False  # admin calls only from loopback unless True
    feedback_token: str | None = None  # None: feedback open to whoever holds a request id (see README)
    access_log: bool = True
    monitor: bool = True  # log a sample of requests for drift, feedback and quality
    monitor_sample_rate: float = 1.0
    monitor_db: Path | None = None  # default: REPO/.monitor/predictions.db
    guard_interval_s: float = 1.0  # how often the rollout guard judges canaries
    explain: ExplainConfig = ExplainConfig()  # explanation pool, budgets and live importance sampling

    def __post_init__(self) -> None:
        for name, flag in (("header_timeout_s", "--header-timeout"), ("keep_alive_timeout_s", "--keep-alive-timeout")):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} ({flag}) must be a number of seconds > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.shed_hold_s, (int, float)) and 0 <= self.shed_hold_s <= 60):
            raise InvalidInput(f"shed_hold_s (--shed-hold) must be seconds from 0 to 60, got {self.shed_hold_s!r}")
        if not (isinstance(self.max_large_bodies, int) and self.max_large_bodies >= 1):
            raise InvalidInput(f"max_large_bodies (--max-large-bodies) must be an integer >= 1, got {self.max_large_bodies!r}")
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            raise InvalidInput(f"max_connections (--max-connections) must be an integer >= 1, got {self.max_connections!r}")

    @classmethod
    def from_env(cls, repo: Path, **overrides) -> ServerConfig:
        """Settings from flags (``overrides``) with the admin token from ``LEANSERVE_ADMIN_TOKEN`` and the
        feedback token from ``LEANSERVE_FEEDBACK_TOKEN``."""
        token = overrides.pop("admin_token", None) or os.environ.get(ADMIN_TOKEN_ENV) or None
        overrides["feedback_token"] = overrides.get("feedback_token") or os.environ.get(FEEDBACK_TOKEN_ENV) or None
        nullable = {"grpc_port", "monitor_db"}  # None means "off" / "default place" for these, not "unset"
        return cls(repo=Path(repo), admin_token=token,
                   **{k: v for k, v in overrides.items() if v is not None or k in nullable})
