"""The state of every target — breaker, last error, latency — for people: `GET /_seaking/status` on the proxy's port
(behind the access key, if one is set) and the `seaking.status` command. Neither shows a key."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from mitmproxy import command, http

from seaking.flows import is_client_flow

if TYPE_CHECKING:
    from seaking.shared import Shared

STATUS_PATH = "/_seaking/status"


class StatusEndpoint:
    """mitmproxy addon: answers GET /_seaking/status itself; provides the seaking.status command."""

    name = "seaking.status"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or self.shared.records.is_answered(flow):
            return
        if flow.request.path == STATUS_PATH and flow.request.method == "GET":
            body = json.dumps(self.status(), indent=2).encode()
            flow.response = http.Response.make(200, body, {"content-type": "application/json"})

    def status(self) -> dict:
        failover = self.shared.snapshot.failover
        budget = failover.budget
        return {
            "load_balancing": failover.pool.strategy,
            "targets": [t.status() for t in failover.targets],
            "retry_budget": None if budget is None else {"percent": budget.percent, "min_per_second": budget.min_per_second},
        }

    @command.command("seaking.status")
    def status_command(self) -> str:
        """Each target's state, last error and latency (no secrets)."""
        return json.dumps(self.status(), indent=2)
