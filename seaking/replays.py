"""mitmweb's Replay of a client flow goes through the proxy like a live request: retries, the key, a fresh comment.

mitmproxy replays the flow object itself (live again, `is_replay == "request"`), so it comes back with the last run's
record, mark and comment, and with the URL its last answer came from. A replay starts afresh: the record, mark and
comment go, and the path is the one the client sent, which the exchange routes again. The key is the one the client
sent if this process still holds it (Redaction keeps it in memory); a flow loaded from a recording carries only the
placeholder, and unless the proxy holds the upstream keys itself it is answered with an error that says how to
replay it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from seaking.dialects import dialect_of
from seaking.errors import ProxyError
from seaking.flows import is_client_flow, is_replay
from seaking.relay import TOKEN_HEADER

if TYPE_CHECKING:
    from seaking.shared import Shared


class Replays:
    """mitmproxy addon: a replayed client flow starts afresh, and is refused if its key is gone."""

    name = "seaking.replays"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or not is_replay(flow):
            return
        client_path = self.shared.records.of(flow).client_path
        self.shared.records.restart(flow)
        flow.marked = flow.comment = ""
        flow.request.headers.pop(TOKEN_HEADER, None)  # left by a run that ended before the relay answered
        if client_path:
            flow.request.path = client_path

    def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or not is_replay(flow) or self.shared.records.is_answered(flow):
            return
        missing = self.shared.redaction.missing_credentials(flow)
        if missing and not all(target.api_key for target in self.shared.snapshot.failover.targets):
            flow.response = dialect_of(flow.request).error_response(key_gone(missing))


def key_gone(headers: list[str]) -> ProxyError:
    named = ", ".join(dict.fromkeys(headers))
    return ProxyError(
        401,
        f"seaking-proxy cannot replay this flow: its client's key ({named}) is never kept in a flow or a recording, "
        "and this process does not hold it. Set target_proxy.api_key in the config (or the SEAKING_API_KEY "
        "environment variable) to replay it with the proxy's own key.",
        "replay_key_missing",
        type="authentication_error",
        short="seaking-proxy: set target_proxy.api_key (or SEAKING_API_KEY) to replay this flow",
    )
