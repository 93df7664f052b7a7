"""Typed configuration: every knob has a name, a unit in its name, a default that works, and one reader.

``ModelConfig`` is what a model's ``config.json`` in the repository holds (what is not per version):
version policy, runtime options, batching, cache and traffic. Each part is a frozen dataclass that
validates itself; ``from_dict`` refuses unknown keys by name so a typo never passes silently.

The parts live beside this module: ``parse`` (from_dict and the checks), ``serving`` (version policy,
runtime, batching, cache, traffic) and ``features`` (lifecycle, rollout, alerts, explain); every class is
imported from ``leanserve.config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from leanserve.config.features import IMPORT_POLICIES, AlertConfig, ExplainConfig, LifecycleConfig, RolloutConfig
from leanserve.config.parse import _check, from_dict, is_version_text, to_dict
from leanserve.config.serving import BatchingConfig, CacheConfig, RuntimeOptions, TrafficConfig, VersionPolicy
from leanserve.errors import InvalidInput

__all__ = [
    "IMPORT_POLICIES", "AlertConfig", "BatchingConfig", "CacheConfig", "ExplainConfig", "LifecycleConfig",
    "ModelConfig", "RolloutConfig", "RuntimeOptions", "TrafficConfig", "VersionPolicy",
    "from_dict", "is_version_text", "to_dict",
]


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model that is not per version, stored as the model's ``config.json``."""

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    allow_nonfinite: bool = True
    warmup: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "config") -> ModelConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"{where}: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        parts = {
            "version_policy": VersionPolicy,
            "runtime": RuntimeOptions,
            "batching": BatchingConfig,
            "cache": CacheConfig,
            "traffic": TrafficConfig,
            "rollout": RolloutConfig,
            "alerts": AlertConfig,
            "lifecycle": LifecycleConfig,
        }
        kwargs: dict[str, Any] = {k: from_dict(c, data.get(k), f"{where}.{k}") for k, c in parts.items()}
        for flag in ("allow_nonfinite", "warmup"):
            if flag in data:
                _check(isinstance(data[flag], bool), f"{where}.{flag}", "expected true or false")
                kwargs[flag] = data[flag]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
