"""Which versions of a model serve: lifecycle states (serving, canary, shadow, registered, retired)
read from the model's traffic settings and its versions' manifests, the traffic moves that promoting or
registering a version makes, and the versions a server loads."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from leanserve.artifact import MANIFEST_FILE
from leanserve.config import ModelConfig, RolloutConfig
from leanserve.repository.files import CONFIG_FILE, VersionRef, _write_atomic, parse_version

if TYPE_CHECKING:
    from leanserve.repository import Repository

# artifacts for devices, never served unless traffic names them (C sources cannot be served at all)
EDGE_FORMATS = frozenset({"ort", "executorch", "c_source"})
STATES = ("serving", "canary", "shadow", "registered", "retired")


class VersionStates:
    """The lifecycle half of ``Repository`` (which this is a base of): it reads versions, manifests and
    settings through the repository's own methods (``versions``, ``config``, ``resolve``, ``_locked``) and
    writes settings under the model's lock."""

    def serving(self, name: str) -> VersionRef | None:
        """The version serving most of the model's traffic, or None when none of its versions serves."""
        available = self.versions(name)
        served = self._serving(name, self.config(name), available)
        return None if served is None else VersionRef(name, served)

    def default_served(self, name: str, config: ModelConfig, available: Sequence[int]) -> list[int]:
        """What a model without traffic settings serves: the newest ``version_policy.n`` versions that are
        neither derived nor edge artifacts (or the newest non-edge ones when every version is derived)."""
        policy = config.version_policy
        if policy.kind != "latest":
            return [v for v in policy.select(list(available)) if self._kind(name, v) != "edge"]
        kinds = {v: self._kind(name, v) for v in available}
        chosen = [v for v in sorted(available) if kinds[v] == "original"] or \
                 [v for v in sorted(available) if kinds[v] != "edge"]
        return chosen[-policy.n:]

    def state(self, name: str) -> dict[int, str]:
        """Each version's lifecycle state: serving, canary (a rollout's or a minor traffic share), shadow,
        retired (took traffic before, not now) or registered (verified on disk, never served)."""
        available = self.versions(name)
        config = self.config(name)
        weights = config.traffic.version_weights()
        if not weights:
            weights = {v: 100 for v in self.default_served(name, config, available)[-1:]}
        top = max(weights.items(), key=lambda item: (item[1], item[0]))[0] if weights else None
        earlier = config.traffic.ever_served()
        states = {}
        for version in available:
            if version in weights:
                states[version] = "serving" if version == top else "canary"
            elif version == config.traffic.shadow:
                states[version] = "shadow"
            elif version in earlier:
                states[version] = "retired"
            else:
                states[version] = "registered"
        return states

    def _serving(self, name: str, config: ModelConfig, available: Sequence[int]) -> int | None:
        weights = {v: w for v, w in config.traffic.version_weights().items() if v in available}
        if weights:
            return max(weights.items(), key=lambda item: (item[1], item[0]))[0]
        if config.traffic.weights:  # traffic names only versions that are gone
            return None
        default = self.default_served(name, config, available)
        return default[-1] if default else None

    def _kind(self, name: str, version: int) -> str:
        """"edge", "derived" or "original", from the version's manifest (unreadable counts as original)."""
        try:
            manifest = json.loads((self.root / name / str(version) / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "original"
        if manifest.get("format") in EDGE_FORMATS or self._edge_pipeline(name, version, manifest):
            return "edge"
        return "derived" if (manifest.get("provenance") or {}).get("parent") else "original"

    def _edge_pipeline(self, name: str, version: int, manifest: Mapping[str, Any]) -> bool:
        """A pipeline version around a device artifact (``leanserve edge`` of a text model: model.ort inside)."""
        if manifest.get("format") != "pipeline":
            return False
        try:
            spec = json.loads((self.root / name / str(version) / str(manifest["model_file"])).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError):
            return False
        return isinstance(spec, dict) and spec.get("model_format") in EDGE_FORMATS

    def promote(self, name: str, version: int | str) -> VersionRef:
        """Send all of the model's traffic to ``version`` (stopping any rollout); the old split goes to
        history, so ``rollback`` returns to it. Raises ModelNotFound or InvalidName."""
        ref = self.resolve(name, parse_version(version))
        with self._locked(name):
            config = self.config(name)
            config = config.replace(traffic=config.traffic.serving_only(ref.version), rollout=RolloutConfig())
            _write_atomic(self._model_dir(name) / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
        return ref

    def _settle_traffic(self, name: str, version: int, before: list[int], serve: bool | None) -> None:
        """Record what the new version does to traffic (under the model's lock)."""
        config = self.config(name)
        if serve is None:
            serve = config.lifecycle.on_import == "serve"
        if not before:
            serve = True  # a first version: there is nothing else to serve
        if serve:
            traffic = config.traffic.serving_only(version)
        elif not config.traffic.weights:
            # a model without traffic settings serves by default; pin what serves now, so the new
            # version (perhaps derived or an edge artifact) does not take over by being newest
            current = self._serving(name, config, before)
            if current is None:
                return
            traffic = config.traffic.serving_only(current)
        else:
            return
        _write_atomic(self._model_dir(name) / CONFIG_FILE, json.dumps(config.replace(traffic=traffic).to_dict(), indent=2))


def versions_to_load(repo: Repository, name: str, config: ModelConfig, available: list[int]) -> set[int]:
    """Versions a server loads: those traffic sends requests to or shadows, plus the version policy's (see
    VersionPolicy); a model without traffic settings gets ``Repository.default_served``. What the server
    loads and what a deployment bundle carries are this one answer."""
    traffic, policy, present = config.traffic, config.version_policy, set(available)
    shadow = {traffic.shadow} & present if traffic.shadow else set()
    if not traffic.weights:
        return shadow | set(repo.default_served(name, config, available))
    pinned = set(traffic.version_weights()) & present
    if policy.kind != "latest":
        return pinned | shadow | set(policy.select(available))
    recent = set(pinned)  # latest n: the served versions, then the most recently served others
    for earlier in reversed(traffic.history):
        for version in sorted((int(v) for v, w in earlier.items() if w > 0), reverse=True):
            if len(recent) < policy.n and version in present:
                recent.add(version)
    return recent | shadow
