"""Which flows are the proxy's, and what its addons tell each other about one: the flow's record.

The record lives in `flow.metadata["seaking"]`, mitmproxy's own place for per-flow notes (proxyauth keeps its user
there): it travels with the flow, is saved in `-w` recordings and can be filtered with `~meta`. So it holds plain data
only, and never a key. Its fields, each set by one addon:

    refused        AccessGuard   the error code of a request refused before its body was read (GracefulShutdown:
                                 proxy_shutdown, for a request that arrived during a shutdown)
    endpoint       Exchange      "chat/completions", "models", ... (None for other paths)
    client_path    Exchange      the path as the client sent it (the flow's URL shows the true upstream)
    attempts       Exchange      one dict per upstream attempt: label, status, target, model, verdict, failure (what
                                 failed in a retried attempt: status, network, timeout, broken), detail, seconds,
                                 wait_before (seconds since the attempt before it ended); AttemptFlows adds "flow",
                                 the id of the attempt's own flow
    elapsed        Exchange      seconds from the request to the answer (or to the stream's start)
    verdict        Exchange      the last attempt's verdict: success, pass_through, fail_fast or retry
    stopped        Exchange      why the attempts stopped: answered, attempts, deadline or budget (retry_policy.StopReason)
    answered_by    Exchange      "upstream" or "seaking-proxy"; ModelsCache: "models cache" or "models fallback"
    status         Exchange      the status the client got
    stream_error   Exchange      the error code a stream was ended with
    heartbeats     Exchange      True when a stream was answered 200 with heartbeats before the upstream answered
    ended_early    Exchange      the error code a request was answered with before its exchange was over (proxy_shutdown)

An attempt flow (one upstream attempt, shown beside its client's flow; attempt_flows.py) has its own record:

    attempt_of     AttemptFlows  the id of the client's flow
    attempt        AttemptFlows  its number (1 = the first), and label, status, target, model, verdict, detail,
                                 seconds, wait_before as in the client's record; stream_error on the stream relayed
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from mitmproxy import connection, http

RECORD_KEY = "seaking"


def is_client_flow(flow: http.HTTPFlow) -> bool:
    """A live request: from a client, or replayed from mitmweb (which makes the flow live again). Not a flow made by
    an addon and loaded into the view, such as an attempt flow: those are never live."""
    return flow.live


def record(flow: http.HTTPFlow) -> dict:
    return flow.metadata.setdefault(RECORD_KEY, {})


def is_answered(flow: http.HTTPFlow) -> bool:
    """Whether an earlier addon has answered the flow (or refused it before its body was read)."""
    return flow.response is not None or "refused" in flow.metadata.get(RECORD_KEY, {})


def is_replay(flow: http.HTTPFlow) -> bool:
    """A flow replayed from mitmweb (or `replay.client`): nobody is waiting for it on a client connection."""
    return flow.is_replay == "request"


def show_upstream(flow: http.HTTPFlow, url: str) -> None:
    """Show `url` as where the flow went, in its URL and in its server connection (mitmweb's Connection tab).

    The flow gets a server connection of its own: the one mitmproxy used (the relay's, for a streamed answer) stays
    as it is for mitmproxy, which may reuse it."""
    if flow.request.url != url:
        flow.request.url = url
    if flow.server_conn.address == _address(urlsplit(url)) and not flow.server_conn.peername:
        return  # mitmproxy's own (unused) server connection already names it: the common, single-target case
    shown = upstream_server(url)
    shown.timestamp_start = flow.server_conn.timestamp_start
    shown.timestamp_tcp_setup = flow.server_conn.timestamp_tcp_setup
    flow.server_conn = shown


def upstream_server(url: str) -> connection.Server:
    """A server connection as mitmweb shows one: the upstream's host and port."""
    parts = urlsplit(url)
    server = connection.Server(address=_address(parts))
    if parts.scheme == "https":
        server.sni = parts.hostname
    return server


def _address(parts: SplitResult) -> tuple[str, int]:
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
