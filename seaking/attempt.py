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
from dataclasses import dataclass

import aiohttp

from retry_policy import Classification, RetryPolicy, classify_response, retry_after_seconds
from seaking.connections import NETWORK_ERRORS, ConnectionPools, classify_exception, upstream_headers
from seaking.dialects import OPENAI, Dialect
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


async def send_attempt(
    pools: ConnectionPools,
    policy: RetryPolicy,
    request: UpstreamRequest,
    target: Target,
    model: str | None,
    deadline_at: float,
) -> tuple[Attempt, UpstreamStream | None]:
    """Send `request` to `target` once. `deadline_at` (time.monotonic()) bounds the whole attempt."""
    url = route(target.base_url, request.path).url
    headers = upstream_headers(request.headers, target.api_key)
    body = request.body_for(target, model)
    sent = SentRequest(request.method, url, tuple(redacted(headers)), body)
    started, started_at = time.monotonic(), time.time()
    continuation = request.continuation.number if request.continuation else 0

    def attempt(classification: Classification, response: aiohttp.ClientResponse | None = None, **answer) -> Attempt:
        if response is not None:
            answer.update(status=response.status, reason=response.reason or "", raw_headers=tuple(response.raw_headers))
        elapsed = time.monotonic() - started
        return Attempt(target, model, sent, classification, started_at, elapsed, continuation=continuation, **answer)

    try:
        async with asyncio.timeout(min(policy.per_try_timeout, deadline_at - started)):
            response = await pools.request(target, request.method, url, headers, data=body or None)
    except NETWORK_ERRORS as exc:
        return attempt(classify_exception(exc)), None
    responded_at = time.time()
    if request.first_event_timeout is not None and 200 <= response.status < 300 and is_event_stream(response.content_type):
        stream, prefetched, classification = await read_first_event(
            response, request.first_event_timeout, deadline_at, request.api
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
    classification = classify_response(policy, response.status, response.content_type, answer, request.expects_json)
    return attempt(
        classification, response, body=answer, retry_after=retry_after_seconds(response.headers), responded_at=responded_at
    ), None
