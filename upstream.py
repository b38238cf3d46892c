"""The upstream exchange: one aiohttp request per attempt, retried by retry_policy.

mitmproxy has no upstream connect or read timeout and cannot answer the client after its own upstream attempt failed,
so the addon does not let mitmproxy talk to the upstream: it calls `UpstreamClient.exchange` from the request hook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from streaming import LiveStream, is_event_stream, read_first_event
from retry_policy import (
    Classification,
    Outcome,
    RetryPolicy,
    classify_exception,
    classify_response,
    retry_after_seconds,
    run_with_retries,
)

logger = logging.getLogger(__name__)

# Hop-by-hop headers, and those aiohttp must set itself (it decodes only the encodings it offers).
_NOT_SENT_UPSTREAM = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding",
     "content-length", "accept-encoding", "upgrade", "te", "trailer"}
)
_UPSTREAM_NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def upstream_headers(client_headers: Iterable[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    """The client's headers as sent upstream; with an api_key, the client's credentials are replaced by it."""
    headers = [(k, v) for k, v in client_headers if k.lower() not in _NOT_SENT_UPSTREAM]
    if api_key:
        sent_x_api_key = any(k.lower() == "x-api-key" for k, _ in headers)
        headers = [(k, v) for k, v in headers if k.lower() not in ("authorization", "x-api-key")]
        headers.append(("Authorization", f"Bearer {api_key}"))
        if sent_x_api_key:  # Anthropic-style /messages clients authenticate with x-api-key
            headers.append(("x-api-key", api_key))
    return headers


@dataclass
class UpstreamAttempt:
    """One try: what came back (status, headers, body) or what went wrong instead."""

    classification: Classification
    elapsed: float
    status: int | None = None
    reason: str = ""
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""  # the whole body; for a live stream, what was read of it so far
    retry_after: float | None = None
    stream: LiveStream | None = None  # a streaming success: the open upstream response, to be relayed

    @property
    def label(self) -> str:
        """Short form for the attempt history: the status, or what failed."""
        if self.status is not None:
            return str(self.status) if self.classification.failure is None or self.status >= 300 else f"{self.status} (bad body)"
        return self.classification.failure.value if self.classification.failure else "?"


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    expects_json: bool
    first_event_timeout: float | None = None  # set for "stream": true requests


class UpstreamClient:
    """Owns the aiohttp session (connection pool) shared by every exchange."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Timeouts are per attempt and per deadline (asyncio.timeout below), not aiohttp's.
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                cookie_jar=aiohttp.DummyCookieJar(),  # clients' cookies pass in headers, never mixed between them
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def exchange(
        self,
        policy: RetryPolicy,
        request: UpstreamRequest,
        on_retry: Callable[[UpstreamAttempt, int, float], None],
    ) -> tuple[Outcome[UpstreamAttempt], list[UpstreamAttempt]]:
        """Send `request` until it gets an answer worth giving, or the policy gives up. Returns every attempt too."""
        history: list[UpstreamAttempt] = []

        async def attempt(deadline_at: float) -> UpstreamAttempt:
            result = await self._attempt(policy, request, deadline_at)
            history.append(result)
            return result

        outcome = await run_with_retries(policy, attempt, on_retry)
        return outcome, history

    async def _attempt(self, policy: RetryPolicy, request: UpstreamRequest, deadline_at: float) -> UpstreamAttempt:
        started = time.monotonic()
        try:
            async with asyncio.timeout(min(policy.per_try_timeout, deadline_at - started)):
                response = await self._get_session().request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    data=request.body or None,
                    allow_redirects=False,
                )
        except _UPSTREAM_NETWORK_ERRORS as exc:
            return UpstreamAttempt(classify_exception(exc), time.monotonic() - started)
        if request.first_event_timeout is not None and 200 <= response.status < 300 and is_event_stream(response.content_type):
            return await self._first_event(request, response, started, deadline_at)
        try:
            # The body may take long (a non-streaming completion is written at the end), but not past the deadline.
            async with asyncio.timeout(max(0.0, deadline_at - time.monotonic())):
                body = await response.read()
        except _UPSTREAM_NETWORK_ERRORS as exc:
            return UpstreamAttempt(classify_exception(exc), time.monotonic() - started, status=response.status)
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
        )

    async def _first_event(
        self, request: UpstreamRequest, response: aiohttp.ClientResponse, started: float, deadline_at: float
    ) -> UpstreamAttempt:
        """A streaming attempt succeeds only with a good first event: until then nothing has reached the client,
        so an error event, an empty stream or a silent upstream can still be retried."""
        timeout = max(0.0, min(request.first_event_timeout, deadline_at - time.monotonic()))
        try:
            live, prefetched, classification = await read_first_event(response, timeout)
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


def describe_history(history: list[UpstreamAttempt], total_seconds: float, final: str | None = None) -> str:
    """For mitmweb comments and logs: '3 attempts: 503, 503 → 200 in 1.4 s'."""
    labels = [a.label for a in history]
    end = final or labels[-1]
    earlier = ", ".join(labels[:-1])
    noun = "attempt" if len(history) == 1 else "attempts"
    path = f"{earlier} → {end}" if earlier else end
    return f"{len(history)} {noun}: {path} in {total_seconds:.1f} s"

