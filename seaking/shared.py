"""The one object the addons share: the loaded config, what is built from it, and the parts every addon uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from seaking.attempt_flows import AttemptFlows
from seaking.config import Config
from seaking.models_cache import ModelListStore
from seaking.redaction import Redaction
from seaking.relay import Relay
from seaking.shutdown import ShutdownSignal
from seaking.upstream import Failover, UpstreamClient


@dataclass
class Shared:
    # Set by Settings from config.yaml (and mitmproxy's --mode) before the first flow.
    config: Config | None = None
    failover: Failover | None = None
    models: ModelListStore | None = None
    # Parts that are addons themselves, and that other addons call.
    redaction: Redaction = field(default_factory=Redaction)
    relay: Relay = field(default_factory=Relay)
    attempt_flows: AttemptFlows = field(default_factory=AttemptFlows)
    # The aiohttp sessions (connection pools) every upstream request goes through.
    upstream: UpstreamClient = field(default_factory=UpstreamClient)
    # Resolves when the shutdown's grace period is over: what is still in flight must end now.
    shutdown: ShutdownSignal = field(default_factory=ShutdownSignal)

    def configured_secrets(self) -> set[str]:
        """The keys (and proxy passwords) the proxy holds: never to be shown anywhere."""
        keys = [t.api_key for t in self.failover.pool.targets] + [self.config.server.access_key]
        keys += [t.proxy.password for t in self.failover.pool.targets if t.proxy]
        return {k for k in keys if k}
