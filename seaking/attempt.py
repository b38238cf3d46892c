"""One upstream attempt: a client's request sent to one target (with one model), and its verdict.

`send_attempt` sends the request through the connection pools, bounded by the per-try timeout (until response
headers) and the request's deadline, reads the answer — the whole body, or for a stream only until its first content
— and judges it with retry_policy. It returns the attempt, built once and frozen, and for a stream that began well the
open `UpstreamStream`, which the caller then owns.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from retry_policy import Classification, RetryPolicy, classify_response, retry_after_seconds
from seaking.connections import NETWORK_ERRORS, ConnectionPools, classify_exception, upstream_headers
from seaking.dialects import OPENAI, Dialect, Usage
from seaking.redaction import redacted
from seaking.resume import Continuation, Prefill
from seaking.routing import route
from seaking.streaming import UpstreamStream, is_event_stream, read_first_event
from seaking.targets import Target


@dataclass(frozen=True)
class UpstreamRequest:
    """The client's request, before a target (URL, key) and a model are chosen for an attempt."""

    method: str
    path: str  # as the client sent it; routed onto each target's base
    headers: list[tuple[str, str]]  # the client's, its credentials included (never shown)
    body: bytes
    expects_json: bool
    api: Dialect = OPENAI  # the API it speaks: how its streams are read
    model: str | None = None  # the JSON body's "model"
    first_event_timeout: float | None = None  # set for "stream": true requests
    continuation: Continuation | None = None  # set: it continues a reply that broke off (resume.py)
    blank: Callable[[object], bool] | None = None  # whether a whole reply has no content (chat endpoints only)

    def body_for(self, target: Target, model: str | None) -> bytes:
        body = self.body
        if model != self.model:
            document = json.loads(body)
            document["model"] = model
            body = json.dumps(document).encode()
        if self.continuation is not None:
            body = self.continuation.body(body, Prefill(target.prefill).resolved(self.api), self.api)
        return body

    def can_go_to(self, target: Target) -> bool:
        """Whether `target` can take this request: any can, but a continuation needs one that takes a prefill."""
        return self.continuation is None or Prefill(target.prefill).resolved(self.api) is not Prefill.NONE


@dataclass(frozen=True)
class SentRequest:
    """An attempt's request as it went upstream, credentials redacted: what its attempt flow shows."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class Attempt:
    """One try: where it went, what was sent, what came back (status, headers, body) or what went wrong, and when."""

    target: Target
    model: str | None  # the model asked for (a fallback model, perhaps)
    sent: SentRequest
    classification: Classification
    started_at: float  # epoch seconds
    elapsed: float  # seconds from sending to the verdict
    status: int | None = None
    reason: str = ""
    raw_headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""  # the whole body; for a stream, what was read until its first content
    retry_after: float | None = None
    responded_at: float | None = None  # epoch seconds when the response headers came
    continuation: int = 0  # which continuation of the reply it asked for (0: the request itself)
    hedged: bool = False  # it passed its per-try timeout and the next attempt started beside it
    usage: Usage | None = None  # the tokens a whole reply reported (a stream's come with its events)

    @property
    def ended_at(self) -> float:
        return self.started_at + self.elapsed

    @property
    def label(self) -> str:
        """Short form for the attempt history: the status, or what failed."""
        failure = self.classification.failure
        if self.status is not None:
            return str(self.status) if failure is None or self.status >= 300 else f"{self.status} (bad body)"
        return failure.value if failure else "?"


@dataclass(frozen=True)
class AttemptPlan:
    """One attempt before it is sent: where it goes, and what (`sent` is that, with the credentials redacted)."""

    request: UpstreamRequest
    target: Target
    model: str | None
    url: str
    headers: list[tuple[str, str]]  # with the target's key: never shown
    sent: SentRequest

    @classmethod
    def of(cls, request: UpstreamRequest, target: Target, model: str | None) -> AttemptPlan:
        url = route(target.base_url, request.path).url
        headers = upstream_headers(request.headers, target.api_key)
        body = request.body_for(target, model)
        return cls(request, target, model, url, headers, SentRequest(request.method, url, tuple(redacted(headers)), body))

    def attempt(self, classification: Classification, started_at: float, elapsed: float, **answer) -> Attempt:
        continuation = self.request.continuation.number if self.request.continuation else 0
        return Attempt(
            self.target, self.model, self.sent, classification, started_at, elapsed, continuation=continuation, **answer
        )


class Overdue:
    """Set when an attempt passes its per-try timeout while it goes on (hedging); awaitable in asyncio.wait."""

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def is_set(self) -> bool:
        return self.future.done()


async def send_attempt(
    pools: ConnectionPools,
    policy: RetryPolicy,
    plan: AttemptPlan,
    deadline_at: float,
    overdue: Overdue | None = None,
) -> tuple[Attempt, UpstreamStream | None]:
    """Send the planned attempt. `deadline_at` (time.monotonic()) bounds it. The per-try timeout — no response
    headers within target_proxy.timeout, or for a stream no content within first_event_timeout — ends it, unless
    `overdue` is given (hedging): then `overdue` is set and the attempt goes on, until the deadline."""
    request = plan.request
    started, started_at = time.monotonic(), time.time()

    def attempt(classification: Classification, response: aiohttp.ClientResponse | None = None, **answer) -> Attempt:
        if response is not None:
            answer.update(status=response.status, reason=response.reason or "", raw_headers=tuple(response.raw_headers))
        return plan.attempt(classification, started_at, time.monotonic() - started, **answer)

    per_try = min(policy.per_try_timeout, deadline_at - started)
    timer = None if overdue is None else asyncio.get_running_loop().call_later(per_try, overdue.set)
    try:
        async with asyncio.timeout(per_try if overdue is None else deadline_at - started):
            response = await pools.request(plan.target, request.method, plan.url, plan.headers, data=plan.sent.body or None)
    except NETWORK_ERRORS as exc:
        return attempt(classify_exception(exc)), None
    finally:
        if timer is not None:
            timer.cancel()
    responded_at = time.time()
    if request.first_event_timeout is not None and 200 <= response.status < 300 and is_event_stream(response.content_type):
        stream, prefetched, classification = await read_first_event(
            response, request.first_event_timeout, deadline_at, request.api, policy.retry_empty, overdue
        )
        return attempt(classification, response, body=prefetched, responded_at=responded_at), stream
    try:
        # The body may take long (a non-streaming completion is written at the end), but not past the deadline.
        async with asyncio.timeout(max(0.0, deadline_at - time.monotonic())):
            answer = await response.read()
    except NETWORK_ERRORS as exc:
        return attempt(classify_exception(exc), response, responded_at=responded_at), None
    finally:
        response.release()
    classification = classify_response(
        policy, response.status, response.content_type, answer, request.expects_json, request.blank
    )
    usage = _usage(request, answer) if request.blank is not None and 200 <= response.status < 300 else None
    return attempt(
        classification, response, body=answer, retry_after=retry_after_seconds(response.headers), responded_at=responded_at,
        usage=usage,
    ), None


def _usage(request: UpstreamRequest, body: bytes) -> Usage | None:
    try:
        return request.api.usage_of(json.loads(body))
    except ValueError:
        return None
