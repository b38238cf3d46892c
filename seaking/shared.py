"""What the proxy's addons share: the parts they call on each other, and the loaded config as one snapshot."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from seaking.attempt_flows import AttemptFlows
from seaking.config import Config
from seaking.connections import ConnectionPools
from seaking.models_cache import ModelListStore
from seaking.records import Records
from seaking.redaction import Redaction
from seaking.relay import Relay
from seaking.shutdown import ShutdownSignal
from seaking.targets import Target
from seaking.upstream_run import Failover


@dataclass(frozen=True)
class Snapshot:
    """Everything a config file makes, swapped as a whole by a reload: a request takes the snapshot of its start and
    keeps it to its end, so it sees the old config and targets or the new ones, never a mix."""

    config: Config
    failover: Failover  # the targets (their breakers carry over a reload), retry budget, model fallbacks
    models: ModelListStore  # the /models cache (kept over a reload while its file stays the same)
    # (target URL, model) that refused a prefill (a continuation's 400): not asked again until the config is reloaded
    refused_prefill: set[tuple[str, str | None]] = field(default_factory=set, compare=False)

    @functools.cached_property
    def named_models(self) -> frozenset[str]:
        """The models the config names (fallbacks, models.fallback)."""
        config = self.config
        named = set(config.models.fallback) | set(config.model_fallbacks)
        named.update(m for fallbacks in config.model_fallbacks.values() for m in fallbacks)
        return frozenset(named)

    def model_label(self, model: str | None) -> str:
        """A model's name where metrics may use it: one the upstream listed or the config names, else "other". A
        client chooses the model, so made-up names must not grow the metrics (and the proxy's memory) without end."""
        if model and (model in self.named_models or model in self.models.model_ids()):
            return model
        return "other"

    @functools.cached_property
    def targets_by_host(self) -> dict[str, Target]:
        """The targets by host:port, as the records name them."""
        return {t.host: t for t in self.failover.targets}

    @functools.cached_property
    def secrets(self) -> frozenset[str]:
        """The keys (and proxy passwords) the proxy holds: never to be shown anywhere."""
        targets = self.failover.targets
        keys = [t.api_key for t in targets] + [self.config.server.access_key]
        keys += [t.proxy.password for t in targets if t.proxy]
        return frozenset(k for k in keys if k)


@dataclass
class Shared:
    """The one object addon.py hands to the addons that need each other's parts."""

    records: Records = field(default_factory=Records)
    redaction: Redaction = field(default_factory=Redaction)
    relay: Relay = field(default_factory=Relay)
    attempt_flows: AttemptFlows = field(init=False)
    pools: ConnectionPools = field(default_factory=ConnectionPools)  # every upstream request goes through them
    shutdown: ShutdownSignal = field(default_factory=ShutdownSignal)  # when requests in flight must end now
    _snapshot: Snapshot | None = None

    def __post_init__(self) -> None:
        self.attempt_flows = AttemptFlows(self.records)

    @property
    def snapshot(self) -> Snapshot:
        """The config in force. Settings loads it in `configure`, before mitmproxy serves a flow."""
        if self._snapshot is None:
            raise RuntimeError("seaking-proxy's config is not loaded: the Settings addon must come first")
        return self._snapshot

    @property
    def loaded(self) -> bool:
        return self._snapshot is not None

    def swap(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
