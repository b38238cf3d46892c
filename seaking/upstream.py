"""The upstream exchange: one aiohttp request per attempt, retried by retry_policy.

mitmproxy has no upstream connect or read timeout and cannot answer the client after its own upstream attempt failed,
so the addon does not let mitmproxy talk to the upstream: it calls `UpstreamClient.exchange` from the request hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp

from retry_policy import (
    Classification,
    Outcome,
    RetryBudget,
    RetryPolicy,
    StopReason,
    Verdict,
    backoff,
    classify_exception,
    classify_response,
    retry_after_seconds,
    run_with_retries,
    wait_unless,
)
from seaking.dialects import OPENAI, Dialect
from seaking.outbound import SOCKS_ERRORS, OutboundProxy, direct_connector
from seaking.redaction import redacted
from seaking.routing import route
from seaking.streaming import LiveStream, is_event_stream, read_first_event
from seaking.targets import Target, TargetPool

logger = logging.getLogger("seaking")

# Hop-by-hop headers, and those aiohttp must set itself (it decodes only the encodings it offers).
_NOT_SENT_UPSTREAM = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding",
     "content-length", "accept-encoding", "upgrade", "te", "trailer"}
)
_UPSTREAM_NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError, *SOCKS_ERRORS)


def upstream_headers(client_headers: Iterable[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    """The client's headers as sent upstream; with an api_key, the client's credentials are replaced by it, in the
    header the client authenticated with: `Authorization: Bearer`, or Anthropic's `x-api-key`."""
    headers = [(k, v) for k, v in client_headers if k.lower() not in _NOT_SENT_UPSTREAM]
    if api_key:
        sent = {k.lower() for k, _ in headers}
        # Anthropic's way: x-api-key (or just anthropic-version) and no Authorization, as SillyTavern's Claude source
        # and the anthropic SDK before 2.x send it; its API then looks for the key there.
        anthropic_style = "authorization" not in sent and bool(sent & {"x-api-key", "anthropic-version"})
        headers = [(k, v) for k, v in headers if k.lower() not in ("authorization", "x-api-key")]
        if not anthropic_style:
            headers.append(("Authorization", f"Bearer {api_key}"))
        if anthropic_style or "x-api-key" in sent:
            headers.append(("x-api-key", api_key))
    return headers


@dataclass(frozen=True)
class SentRequest:
    """An attempt's request as it went upstream, credentials redacted: what its attempt flow shows."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class UpstreamAttempt:
    """One try: what was sent, what came back (status, headers, body) or what went wrong instead, and when."""

    classification: Classification
    elapsed: float  # seconds from sending to the verdict
    status: int | None = None
    reason: str = ""
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""  # the whole body; for a live stream, what was read of it so far
    retry_after: float | None = None
    stream: LiveStream | None = None  # a streaming success: the open upstream response, to be relayed
    target: Target | None = None
    model: str | None = None  # the model asked for in this attempt (a fallback model, perhaps)
    sent: SentRequest | None = None
    started_at: float = 0.0  # epoch seconds
    responded_at: float | None = None  # epoch seconds when the response headers came

    @property
    def ended_at(self) -> float:
        return self.started_at + self.elapsed

    @property
    def label(self) -> str:
        """Short form for the attempt history: the status, or what failed."""
        if self.status is not None:
            return str(self.status) if self.classification.failure is None or self.status >= 300 else f"{self.status} (bad body)"
        return self.classification.failure.value if self.classification.failure else "?"


@dataclass(frozen=True)
class UpstreamRequest:
    """The client's request, before a target (URL, key) and a model are chosen for an attempt."""

    method: str
    path: str  # as the client sent it; routed onto each target's base
    headers: list[tuple[str, str]]  # the client's
    body: bytes
    expects_json: bool
    api: Dialect = OPENAI  # the API it speaks: how its streams are read
    model: str | None = None  # the JSON body's "model"
    first_event_timeout: float | None = None  # set for "stream": true requests

    def body_for(self, model: str | None) -> bytes:
        if model == self.model:
            return self.body
        document = json.loads(self.body)
        document["model"] = model
        return json.dumps(document).encode()


@dataclass(frozen=True)
class Failover:
    """Where attempts may go: the targets, and models to fall back on."""

    pool: TargetPool
    budget: RetryBudget | None = None
    model_fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def models_for(self, model: str | None) -> list[str | None]:
        return [model, *self.model_fallbacks.get(model, ())] if model else [model]


class UpstreamClient:
    """Owns the aiohttp sessions (connection pools) shared by every exchange: one direct, one per outbound proxy."""

    def __init__(self) -> None:
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}  # proxy URL (None: direct) -> its session

    def session(self, proxy: OutboundProxy | None = None) -> aiohttp.ClientSession:
        key = proxy.url if proxy else None
        session = self._sessions.get(key)
        if session is None or session.closed:
            session = self._sessions[key] = aiohttp.ClientSession(
                # Timeouts are per attempt and per deadline (asyncio.timeout below), not aiohttp's.
                timeout=aiohttp.ClientTimeout(total=None),
                connector=proxy.connector() if proxy else direct_connector(),
                cookie_jar=aiohttp.DummyCookieJar(),  # clients' cookies pass in headers, never mixed between them
            )
        return session

    def request(self, target: Target, method: str, url: str, headers: list[tuple[str, str]], **kwargs):
        """aiohttp's request, through the target's outbound proxy if it has one."""
        proxy = target.proxy
        if proxy is not None:
            headers, options = proxy.request_options(url, headers)
            kwargs.update(options)
        return self.session(proxy).request(method, url, headers=headers, **kwargs)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def exchange(
        self,
        policy: RetryPolicy,
        request: UpstreamRequest,
        failover: Failover,
        on_retry: Callable[[UpstreamAttempt, int, float], None],
        on_attempt: Callable[[UpstreamAttempt], None] = lambda attempt: None,
    ) -> tuple[Outcome[UpstreamAttempt], list[UpstreamAttempt]]:
        """Send `request` until it gets an answer worth giving, or the policy gives up. Returns every attempt too
        (each is also passed to `on_attempt` as soon as it is judged, so that none is lost if the exchange is cancelled).

        Attempts go round the healthy targets without waiting while one is left untried in the round; then back off.
        When a model's attempts are used up, or the upstream says the model is unavailable, its fallback is next.
        """
        history: list[UpstreamAttempt] = []
        deadline_at = time.monotonic() + policy.deadline
        if failover.budget is not None:
            failover.budget.record_request()
        models = failover.models_for(request.model)
        try:
            for index, model in enumerate(models):
                another_model = index + 1 < len(models)
                outcome = await self._try_model(
                    policy, request, failover, model, another_model, deadline_at, history, on_retry, on_attempt
                )
                last = outcome.last
                model_done = outcome.stopped is StopReason.ATTEMPTS or last.classification.model_unavailable
                if not (another_model and model_done and last.classification.verdict is not Verdict.SUCCESS):
                    break
                logger.info(
                    f"{request.method} {request.path}: model {model} failed ({last.classification.detail}); "
                    f"trying {models[index + 1]}"
                )
        except BaseException:  # cancelled (the client left): an open upstream stream must not outlive us
            for attempt in history:
                if attempt.stream is not None:
                    attempt.stream.close()
            raise
        return dataclasses.replace(outcome, attempts=len(history)), history

    async def _try_model(
        self,
        policy: RetryPolicy,
        request: UpstreamRequest,
        failover: Failover,
        model: str | None,
        another_model: bool,
        deadline_at: float,
        history: list[UpstreamAttempt],
        on_retry: Callable[[UpstreamAttempt, int, float], None],
        on_attempt: Callable[[UpstreamAttempt], None],
    ) -> Outcome[UpstreamAttempt]:
        """One model's attempts, round the targets, within what is left of the request's deadline."""
        body = request.body_for(model)
        route_plan = failover.pool.plan()

        async def attempt(attempt_deadline: float) -> UpstreamAttempt:
            target = route_plan.next_target()
            result = await self._attempt(policy, request, target, model, body, attempt_deadline)
            history.append(result)
            on_attempt(result)
            return result

        return await run_with_retries(
            dataclasses.replace(policy, deadline=max(0.001, deadline_at - time.monotonic())),
            attempt,
            on_retry,
            wait=wait_unless(route_plan.another_target_left, backoff(policy, rounds=lambda state: route_plan.round)),
            budget=failover.budget,
            # The upstream says this model is unavailable: the next model beats another try of this one.
            give_up_on=lambda last: another_model and last.classification.model_unavailable,
        )

    async def _attempt(
        self,
        policy: RetryPolicy,
        request: UpstreamRequest,
        target: Target,
        model: str | None,
        body: bytes,
        deadline_at: float,
    ) -> UpstreamAttempt:
        attempt = await self._send(policy, request, target, body, deadline_at)
        attempt.target, attempt.model = target, model
        failed = attempt.classification.verdict is Verdict.RETRY and not attempt.classification.model_unavailable
        target.record(ok=not failed, latency=attempt.elapsed, error=attempt.classification.detail if failed else None)
        return attempt

    async def _send(
        self, policy: RetryPolicy, request: UpstreamRequest, target: Target, body: bytes, deadline_at: float
    ) -> UpstreamAttempt:
        url = route(target.base_url, request.path).url
        headers = upstream_headers(request.headers, target.api_key)
        started_at = time.time()
        attempt = await self._request(policy, request, target, url, headers, body, deadline_at)
        attempt.sent = SentRequest(request.method, url, redacted(headers), body)
        attempt.started_at = started_at
        return attempt

    async def _request(
        self,
        policy: RetryPolicy,
        request: UpstreamRequest,
        target: Target,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        deadline_at: float,
    ) -> UpstreamAttempt:
        started = time.monotonic()
        try:
            async with asyncio.timeout(min(policy.per_try_timeout, deadline_at - started)):
                response = await self.request(
                    target, request.method, url, headers=headers, data=body or None, allow_redirects=False
                )
        except _UPSTREAM_NETWORK_ERRORS as exc:
            return UpstreamAttempt(classify_exception(exc), time.monotonic() - started)
        responded_at = time.time()
        if request.first_event_timeout is not None and 200 <= response.status < 300 and is_event_stream(response.content_type):
            first_event = await self._first_event(request, response, started, deadline_at)
            return dataclasses.replace(first_event, responded_at=responded_at)
        try:
            # The body may take long (a non-streaming completion is written at the end), but not past the deadline.
            async with asyncio.timeout(max(0.0, deadline_at - time.monotonic())):
                body = await response.read()
        except _UPSTREAM_NETWORK_ERRORS as exc:
            return UpstreamAttempt(
                classify_exception(exc), time.monotonic() - started, status=response.status, reason=response.reason or "",
                raw_headers=list(response.raw_headers), responded_at=responded_at,
            )
        finally:
            response.release()
        return UpstreamAttempt(
            classification=classify_response(
                policy, response.status, response.content_type, body, request.expects_json
            ),
            elapsed=time.monotonic() - started,
            status=response.status,
            reason=response.reason or "",
            raw_headers=list(response.raw_headers),
            body=body,
            retry_after=retry_after_seconds(response.headers),
            responded_at=responded_at,
        )

    async def _first_event(
        self, request: UpstreamRequest, response: aiohttp.ClientResponse, started: float, deadline_at: float
    ) -> UpstreamAttempt:
        """A streaming attempt succeeds only with a good first event: until then nothing has reached the client,
        so an error event, an empty stream or a silent upstream can still be retried."""
        try:
            live, prefetched, classification = await read_first_event(
                response, request.first_event_timeout, deadline_at, request.api
            )
        except BaseException:  # cancelled: the client left while we waited for the first event
            response.close()
            raise
        return UpstreamAttempt(
            classification=classification,
            elapsed=time.monotonic() - started,
            status=response.status,
            reason=response.reason or "",
            raw_headers=list(response.raw_headers),
            body=prefetched,
            stream=live,
        )

    async def probe(self, target: Target, policy: RetryPolicy) -> None:
        """A health check: GET <base>/models with the target's key. Any answer that is not worth a retry counts as
        healthy (a 401 still means the target is up); the result goes to the target's breaker and status."""
        headers = [("Authorization", f"Bearer {target.api_key}")] if target.api_key else []
        started = time.monotonic()
        try:
            async with asyncio.timeout(policy.per_try_timeout):
                async with self.request(
                    target, "GET", route(target.base_url, "/v1/models").url, headers=headers, allow_redirects=False
                ) as response:
                    body = await response.read()
            result = classify_response(policy, response.status, response.content_type, body, expects_json=True)
        except _UPSTREAM_NETWORK_ERRORS as exc:
            result = classify_exception(exc)
        failed = result.verdict is Verdict.RETRY
        target.record(ok=not failed, latency=time.monotonic() - started, error=f"health check: {result.detail}" if failed else None)
        if not failed:
            logger.debug(f"health check: {target.host} is up")
