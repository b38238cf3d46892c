"""Upstream attempts as flows of their own, beside their client's flow in mitmweb and in `-w` recordings.

The proxy talks to the upstream itself (aiohttp), so mitmproxy sees only the client's flow. Where the attempts tell
something — more than one, or one that failed (a stream that broke included) — this addon builds a flow for each: the
request as it was sent (credentials redacted), the upstream's status, headers and body — for the stream that was
relayed, everything read from it (up to streaming.RECEIVED_LIMIT); for a stream judged at its first event, what was read until
then — or the error (refused, reset, timeout) as the flow's error, with the attempt's real timestamps, and the
upstream's address as its server connection. A request answered well at its first attempt gets none: its client flow
already shows that exchange (the replay lab rebuilds it from there). They are loaded when the client's flow is over,
all at once, so that a client that left early still shows its attempts.

A loaded flow goes through every addon's hooks, as mitmproxy's own `load_flow` does (the view shows it, `save` writes
it), but without `load_flow`'s rewriting of the URL to the reverse target. It is never live: that is how every addon
of the proxy knows to leave it alone. The records link both ways (records.py): the attempt flow's `attempt_of` and
number, and the client's `attempts[i].flow`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy import connection, ctx, eventsequence, http
from mitmproxy.flow import Error
from mitmproxy.proxy.layers.http import HttpResponseHook

from retry_policy import Failure, Verdict
from seaking.answers import forwardable_headers
from seaking.attempt import Attempt
from seaking.flow_notes import describe_stream_end
from seaking.flows import flows_are_seen, upstream_server
from seaking.records import RECORD_KEY, AnsweredBy, AttemptFlowRecord, AttemptRecord, FlowRecord, Records, ResumeOutcome
from seaking.redaction import scrub, scrub_response
from seaking.streaming import UpstreamStream

ATTEMPT_MARK = ":arrow_right_hook:"  # ↪ in mitmweb's list: a step of the flow above, not a request of its own
# Connection-level failures: the attempt flow's error. Other failures show in its response (an empty or broken body).
_ERRORS = (Failure.NETWORK, Failure.TIMEOUT)
# Stream errors that happened on the upstream connection after the first event (not just an incomplete reply).
STREAM_BREAKS = {
    "stream_interrupted": "upstream connection dropped in the middle of the stream",
    "stream_idle_timeout": "upstream went silent in the middle of the stream",
}


@dataclass
class _Noted:
    attempt: Attempt
    stream: UpstreamStream | None  # the stream that was relayed: read later, for what it brought


class AttemptFlows:
    """mitmproxy addon: the attempts of each client flow, loaded as flows of their own when the client flow ends."""

    name = "seaking.attempt_flows"

    def __init__(self, records: Records) -> None:
        self.records = records
        self._pending: dict[str, tuple[set[str], list[_Noted]]] = {}  # client flow id -> secrets, its attempts

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_attempt_flows", bool, True,
            "Show upstream attempts as flows of their own, beside their client's flow, wherever flows can be looked "
            "at: a flow list (mitmweb, mitmproxy's console) or a recording (-w). A request answered at its first "
            "attempt gets none.",
        )

    def note(self, flow: http.HTTPFlow, attempt: Attempt, stream: UpstreamStream | None, secrets: set[str]) -> None:
        """An attempt of `flow` is over (the Exchange calls this for each). For the stream to be relayed, keep what
        is read from it from now on, so that its attempt flow can show it."""
        # Attempt flows cost about as much CPU as their client's flow: not made where nobody would see them.
        if not (flows_are_seen() and ctx.options.seaking_attempt_flows):
            return
        if stream is not None:
            stream.received = bytearray()
        self._pending.setdefault(flow.id, (secrets, []))[1].append(_Noted(attempt, stream))

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._flush(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._flush(flow)

    async def _flush(self, parent: http.HTTPFlow) -> None:
        # Only client flows have attempts noted (a killed one is no longer live, but still has its attempts).
        pending = self._pending.pop(parent.id, None)
        if pending is None:
            return
        secrets, noted = pending
        noted.sort(key=lambda n: n.attempt.started_at)  # heard of as each ended; hedged ones overlap: in their order
        client = self.records.of(parent)
        if not tells_something(client, len(noted)):
            return
        summaries = attempt_records([n.attempt for n in noted], secrets)
        for number, (item, summary) in enumerate(zip(noted, summaries, strict=True), 1):
            flow = attempt_flow(parent, client, item, number, summaries, secrets, [n.attempt for n in noted[number:]])
            if number <= len(client.attempts):
                client.attempts[number - 1].flow = flow.id
            await _load(flow)


def tells_something(client: FlowRecord, attempts: int) -> bool:
    """Whether a request's attempts are worth a flow each: more than one, or one that did not simply succeed."""
    return attempts > 1 or client.verdict is not Verdict.SUCCESS or client.stream_error is not None or bool(client.resumes)


async def _load(flow: http.HTTPFlow) -> None:
    """mitmproxy's load_flow without its reverse-mode rewrite of the URL. A flow with a response and an error (a
    broken body, a dropped stream) skips the response hook, else `save` would write it twice."""
    for event in eventsequence.iterate(flow):
        if isinstance(event, HttpResponseHook) and flow.error is not None:
            continue
        await ctx.master.addons.handle_lifecycle(event)


def attempt_records(attempts: Sequence[Attempt], secrets: set[str]) -> list[AttemptRecord]:
    """The attempts as the client flow's record lists them: plain data, no key."""
    ends = [0.0] + [a.ended_at for a in attempts[:-1]]
    return [
        AttemptRecord(
            label=a.label,
            verdict=a.classification.verdict,
            status=a.status,
            target=a.target.host,
            model=a.model,
            failure=a.classification.failure,
            detail=scrub(a.classification.detail, secrets),
            seconds=round(a.elapsed, 3),
            # Seconds since the attempt before it ended (back-off, Retry-After); 0 for the first, and for the first
            # attempt of a continuation (it began when the stream before it broke, not after a wait).
            wait_before=0.0 if i == 0 or a.continuation != attempts[i - 1].continuation
            else round(max(0.0, a.started_at - ends[i]), 3),
            continuation=a.continuation,
            hedged=a.hedged,
            prompt_tokens=a.usage.prompt if a.usage else None,
            completion_tokens=a.usage.completion if a.usage else None,
        )
        for i, a in enumerate(attempts)
    ]


def attempt_flow(
    parent: http.HTTPFlow,
    client: FlowRecord,
    noted: _Noted,
    number: int,
    summaries: list[AttemptRecord],
    secrets: set[str],
    later: list[Attempt],
) -> http.HTTPFlow:
    """The attempt as a flow that is not live. `later`: the attempts made after it."""
    attempt, stream = noted.attempt, noted.stream
    sent = attempt.sent
    flow = http.HTTPFlow(parent.client_conn.copy(), _server(sent.url, attempt), live=False)
    flow.request = http.Request.make(sent.method, sent.url, sent.body, http.Headers(_encoded(sent.headers)))
    flow.request.timestamp_start = flow.request.timestamp_end = attempt.started_at
    ending = _stream_ending(client, attempt, later) if stream is not None else None
    ended_at = ending.at if ending else attempt.ended_at
    if attempt.status is not None:
        flow.response = _response(attempt, stream, secrets, ended_at)
    stream_error = ending.problem if ending else None
    if attempt.classification.failure in _ERRORS:
        flow.error = Error(scrub(attempt.classification.detail, secrets), ended_at)
    elif stream_error in STREAM_BREAKS:
        flow.error = Error(f"{STREAM_BREAKS[stream_error]} ({stream_error})", ended_at)
    summary = summaries[number - 1]
    flow.metadata[RECORD_KEY] = AttemptFlowRecord(parent.id, number, summary, stream_error).to_metadata()
    flow.marked = ATTEMPT_MARK
    if ending is not None:
        outcome = describe_stream_end(ending.problem, ending.chars, ended_at - attempt.started_at) + ending.then
    else:
        outcome = _what_came_next(client, summaries, number)
    flow.comment = describe_attempt(summary, number, len(summaries), outcome)
    return flow


@dataclass
class _StreamEnding:
    problem: str | None  # the error code it ended with (None: complete)
    chars: int  # reply characters the client had by then
    at: float  # epoch seconds
    then: str = ""  # what came after a break: the reply resumed, or not


def _stream_ending(client: FlowRecord, attempt: Attempt, later: list[Attempt]) -> _StreamEnding:
    """How the stream of a relayed attempt ended: the break a continuation took over from, or the client's end."""
    number = attempt.continuation
    if number < len(client.resumes):
        resume = client.resumes[number]
        at = later[0].started_at if later else time.time()  # its continuation's first attempt began at the break
        then = " → resumed" if resume.outcome is ResumeOutcome.CONTINUED else " → not resumed"
        return _StreamEnding(resume.after, resume.at_chars, at, then)
    return _StreamEnding(client.stream_error, client.reply_chars or 0, time.time())


def _what_came_next(client: FlowRecord, summaries: list[AttemptRecord], number: int) -> str:
    """How the request went on after this attempt: another try, another target or model, or how it ended."""
    this = summaries[number - 1]
    if this.detail.startswith("closed:"):
        return "→ closed"  # a hedge that lost, or the deadline came
    raced = any(s.detail.startswith(f"closed: attempt {number} ") for s in summaries)
    if raced:
        return "→ success, answered first" if this.verdict is Verdict.SUCCESS else "→ answered first"
    if this.hedged and this.verdict is Verdict.RETRY:
        return "→ hedged, then failed"
    if number < len(summaries):
        following = summaries[number]
        if following.target != this.target:
            return f"→ failed over to {following.target}"
        if following.model != this.model:
            return f"→ failed over to model {following.model}"
        return "→ retry"
    if client.answered_by in (AnsweredBy.MODELS_CACHE, AnsweredBy.MODELS_FALLBACK):
        return f"→ {client.answered_by.value}"
    if this.verdict is Verdict.RETRY:
        return "→ gave up"
    return "→ " + this.verdict.value.replace("_", " ")


def describe_attempt(summary: AttemptRecord, number: int, total: int, outcome: str) -> str:
    """'attempt 2 of 4: 503 → retry (upstream answered 503) after waiting 0.4 s'."""
    joiner = " " if outcome.startswith("→") else ", "
    which = f" (continuation {summary.continuation})" if summary.continuation else ""
    text = f"attempt {number} of {total}{which}: {summary.label}{joiner}{outcome}"
    detail = summary.detail.removeprefix("closed: ") if outcome == "→ closed" else summary.detail
    if detail:
        text += f" ({detail})"
    if summary.wait_before >= 0.05:
        text += f" after waiting {summary.wait_before:.1f} s"
    return text


def _response(attempt: Attempt, stream: UpstreamStream | None, secrets: set[str], ended_at: float) -> http.Response:
    body = attempt.body
    if stream is not None and stream.received:
        body += bytes(stream.received)
    # aiohttp has decoded any content-encoding: the headers that describe the connection or the encoding go.
    response = http.Response.make(attempt.status, body, http.Headers(_encoded(forwardable_headers(attempt.raw_headers))))
    response.reason = attempt.reason
    response.timestamp_start = attempt.responded_at or attempt.started_at
    response.timestamp_end = ended_at
    scrub_response(response, secrets)
    return response


def _server(url: str, attempt: Attempt) -> connection.Server:
    server = upstream_server(url)
    server.timestamp_start = attempt.started_at
    return server


def _encoded(headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in headers]
