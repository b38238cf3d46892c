"""Each upstream attempt as a flow of its own, beside its client's flow in mitmweb and in `-w` recordings.

The proxy talks to the upstream itself (aiohttp), so mitmproxy sees only the client's flow. For every attempt this
addon builds a flow: the request as it was sent (credentials redacted), the upstream's status, headers and body — for
the stream that was relayed, everything read from it; for a stream judged at its first event, what was read until
then — or the error (refused, reset, timeout) as the flow's error, with the attempt's real timestamps, and the
upstream's address as its server connection. They are loaded into mitmproxy when the client's flow is over, all at
once, so that a client that left early still shows its attempts.

A loaded flow goes through every addon's hooks, as mitmproxy's own `load_flow` does (the view shows it, `save` writes
it), but without `load_flow`'s rewriting of the URL to the reverse target. It is never live: that is how every addon
of the proxy knows to leave it alone. The records (flows.py) link both ways: the attempt flow's `attempt_of` and
`attempt`, and the client's `attempts[i]["flow"]`.
"""

from __future__ import annotations

import time

from mitmproxy import connection, ctx, eventsequence, http
from mitmproxy.flow import Error
from mitmproxy.proxy.layers.http import HttpResponseHook

from retry_policy import Failure
from seaking.answers import forwardable_headers
from seaking.flows import RECORD_KEY, record, upstream_server
from seaking.redaction import scrub, scrub_response
from seaking.upstream import UpstreamAttempt

ATTEMPT_MARK = ":arrow_right_hook:"  # ↪ in mitmweb's list: a step of the flow above, not a request of its own
# Connection-level failures: the attempt flow's error. Other failures show in its response (an empty or broken body).
_ERRORS = (Failure.NETWORK, Failure.TIMEOUT)
# Stream errors that happened on the upstream connection after the first event (not just an incomplete reply).
STREAM_BREAKS = {
    "stream_interrupted": "upstream connection dropped in the middle of the stream",
    "stream_idle_timeout": "upstream went silent in the middle of the stream",
}


class AttemptFlows:
    """mitmproxy addon: the attempts of each client flow, loaded as flows of their own when the client flow ends."""

    name = "seaking.attempt_flows"

    def __init__(self) -> None:
        self._pending: dict[str, tuple[set[str], list[UpstreamAttempt]]] = {}  # client flow id -> secrets, attempts

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_attempt_flows", bool, True,
            "Show each upstream attempt as a flow of its own, beside its client's flow, wherever flows can be looked "
            "at: a flow list (mitmweb, mitmproxy's console) or a recording (-w).",
        )

    def note(self, flow: http.HTTPFlow, attempt: UpstreamAttempt, secrets: set[str]) -> None:
        """An attempt of `flow` is over (Exchange calls this for each). For the stream to be relayed, keep what is
        read from it from now on, so that its attempt flow can show the whole of it."""
        if not self._seen():
            return
        if attempt.stream is not None:
            attempt.stream.received = bytearray()
        self._pending.setdefault(flow.id, (secrets, []))[1].append(attempt)

    @staticmethod
    def _seen() -> bool:
        """Attempt flows cost about as much CPU as their client's flow. Plain mitmdump without -w shows no flows to
        anyone (its console prints a line per flow; the proxy's log already has one per failed attempt), so there
        they are not made."""
        shown = ctx.master.addons.get("view") is not None or bool(ctx.options.save_stream_file)
        return shown and ctx.options.seaking_attempt_flows

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._flush(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._flush(flow)

    async def _flush(self, parent: http.HTTPFlow) -> None:
        # Only client flows have attempts noted (a killed one is no longer live, but still has its attempts).
        if parent.id not in self._pending:
            return
        secrets, attempts = self._pending.pop(parent.id)
        parent_record = record(parent)
        summaries = parent_record.get("attempts") or []
        for number, (attempt, wait) in enumerate(zip(attempts, waits_before(attempts)), 1):
            stream_error = parent_record.get("stream_error") if attempt.stream is not None else None
            flow = attempt_flow(parent, attempt, number, len(attempts), wait, secrets, stream_error)
            if number <= len(summaries):
                summaries[number - 1]["flow"] = flow.id
            await _load(flow)


async def _load(flow: http.HTTPFlow) -> None:
    """mitmproxy's load_flow without its reverse-mode rewrite of the URL. A flow with a response and an error (a
    broken body, a dropped stream) skips the response hook, else `save` would write it twice."""
    for event in eventsequence.iterate(flow):
        if isinstance(event, HttpResponseHook) and flow.error is not None:
            continue
        await ctx.master.addons.handle_lifecycle(event)


def waits_before(attempts: list[UpstreamAttempt]) -> list[float]:
    """Seconds between each attempt and the end of the one before it (back-off, Retry-After); 0 for the first."""
    ends = [0.0] + [a.ended_at for a in attempts[:-1]]
    return [0.0 if i == 0 else round(max(0.0, a.started_at - ends[i]), 3) for i, a in enumerate(attempts)]


def attempt_summary(attempt: UpstreamAttempt, secrets: set[str], wait_before: float) -> dict:
    """One attempt in a flow's record: plain data, no key."""
    return {
        "label": attempt.label,
        "status": attempt.status,
        "target": attempt.target.host if attempt.target else None,
        "model": attempt.model,
        "verdict": attempt.classification.verdict.value,
        "failure": attempt.classification.failure.value if attempt.classification.failure else None,
        "detail": scrub(attempt.classification.detail, secrets),
        "seconds": round(attempt.elapsed, 3),
        "wait_before": wait_before,
    }


def attempt_flow(
    parent: http.HTTPFlow,
    attempt: UpstreamAttempt,
    number: int,
    total: int,
    wait_before: float,
    secrets: set[str],
    stream_error: str | None = None,
) -> http.HTTPFlow:
    """The attempt as a flow that is not live. `stream_error`: how the client's stream ended, for the relayed one."""
    sent = attempt.sent
    flow = http.HTTPFlow(parent.client_conn.copy(), _server(sent.url, attempt), live=False)
    flow.request = http.Request.make(sent.method, sent.url, sent.body, http.Headers(_encoded(sent.headers)))
    flow.request.timestamp_start = flow.request.timestamp_end = attempt.started_at
    ended_at = time.time() if attempt.stream is not None else attempt.ended_at
    if attempt.status is not None:
        flow.response = _response(attempt, secrets, ended_at)
    failure = attempt.classification.failure
    if failure in _ERRORS:
        flow.error = Error(scrub(attempt.classification.detail, secrets), ended_at)
    elif stream_error in STREAM_BREAKS:
        flow.error = Error(f"{STREAM_BREAKS[stream_error]} ({stream_error})", ended_at)
    summary = attempt_summary(attempt, secrets, wait_before)
    if stream_error:
        summary["stream_error"] = stream_error
    flow.metadata[RECORD_KEY] = {"attempt_of": parent.id, "attempt": number, **summary}
    flow.marked = ATTEMPT_MARK
    flow.comment = describe_attempt(summary, number, total)
    return flow


def describe_attempt(summary: dict, number: int, total: int) -> str:
    """'attempt 2 of 4: 503 → retry (upstream answered 503) after waiting 0.4 s'."""
    text = f"attempt {number} of {total}: {summary['label']} → {summary['verdict'].replace('_', ' ')}"
    if summary["detail"]:
        text += f" ({summary['detail']})"
    if summary["wait_before"] >= 0.05:
        text += f" after waiting {summary['wait_before']:.1f} s"
    if summary.get("stream_error"):
        text += f"; the stream then ended with {summary['stream_error']}"
    return text


def _response(attempt: UpstreamAttempt, secrets: set[str], ended_at: float) -> http.Response:
    body = attempt.body
    if attempt.stream is not None and attempt.stream.received:
        body += bytes(attempt.stream.received)
    # aiohttp has decoded any content-encoding: the headers that describe the connection or the encoding go.
    response = http.Response.make(attempt.status, body, http.Headers(_encoded(forwardable_headers(attempt.raw_headers))))
    response.reason = attempt.reason
    response.timestamp_start = attempt.responded_at or attempt.started_at
    response.timestamp_end = ended_at
    scrub_response(response, secrets)
    for name, value in list(response.headers.items(multi=True)):
        if scrub(value, secrets) != value:
            response.headers[name] = scrub(value, secrets)
    return response


def _server(url: str, attempt: UpstreamAttempt) -> connection.Server:
    server = upstream_server(url)
    server.timestamp_start = attempt.started_at
    return server


def _encoded(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers]
