"""Which flows are the proxy's, and what its addons tell each other about one: the flow's record.

The record lives in `flow.metadata["seaking"]`, mitmproxy's own place for per-flow notes (proxyauth keeps its user
there): it travels with the flow, is saved in `-w` recordings and can be filtered with `~meta`. So it holds plain data
only, and never a key. Its fields, each set by one addon:

    refused        AccessGuard   the error code of a request refused before its body was read (GracefulShutdown:
                                 proxy_shutdown, for a request that arrived during a shutdown)
    endpoint       Exchange      "chat/completions", "models", ... (None for other paths)
    client_path    Exchange      the path as the client sent it (the flow's URL shows the true upstream)
    attempts       Exchange      one dict per upstream attempt: label, status, target, model, verdict, failure (what
                                 failed in a retried attempt: status, network, timeout, broken), detail, seconds
    elapsed        Exchange      seconds from the request to the answer (or to the stream's start)
    verdict        Exchange      the last attempt's verdict: success, pass_through, fail_fast or retry
    stopped        Exchange      why the attempts stopped: answered, attempts, deadline or budget (retry_policy.StopReason)
    answered_by    Exchange      "upstream" or "seaking-proxy"; ModelsCache: "models cache" or "models fallback"
    status         Exchange      the status the client got
    stream_error   Exchange      the error code a stream was ended with
    ended_early    Exchange      the error code a request was answered with before its exchange was over (proxy_shutdown)
"""

from __future__ import annotations

from mitmproxy import http

RECORD_KEY = "seaking"


def is_client_flow(flow: http.HTTPFlow) -> bool:
    """A live request from a client. Not a replay from mitmweb's UI (the user's own experiment, sent as recorded),
    nor a flow made by an addon and loaded into the view (it is live=False)."""
    return flow.live and not flow.is_replay


def record(flow: http.HTTPFlow) -> dict:
    return flow.metadata.setdefault(RECORD_KEY, {})


def is_answered(flow: http.HTTPFlow) -> bool:
    """Whether an earlier addon has answered the flow (or refused it before its body was read)."""
    return flow.response is not None or "refused" in flow.metadata.get(RECORD_KEY, {})
