"""The HTTP client side of every upstream request: aiohttp's connection pools (one direct, one per outbound proxy),
the headers a request goes upstream with, and what aiohttp's and aiohttp-socks's exceptions mean for a retry.

Timeouts are not aiohttp's: an attempt is bounded by its per-try timeout and the request's deadline (attempt.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

import aiohttp
import aiohttp_socks

from retry_policy import Classification, Failure, Verdict
from seaking.outbound import SOCKS_ERRORS, OutboundProxy, direct_connector
from seaking.targets import Target

# What an upstream request may raise when the network, the upstream or an outbound proxy fails it.
NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError, *SOCKS_ERRORS)

# Hop-by-hop headers, and those aiohttp must set itself (it decodes only the encodings it offers).
_NOT_SENT_UPSTREAM = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding",
     "content-length", "accept-encoding", "upgrade", "te", "trailer"}
)


class ConnectionPools:
    """The aiohttp sessions every upstream request goes through: one direct, one per outbound proxy. Shared by all
    requests for the life of the process (a config reload keeps them: a target's proxy is part of its identity)."""

    def __init__(self) -> None:
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}  # proxy URL (None: direct) -> its session

    def session(self, proxy: OutboundProxy | None = None) -> aiohttp.ClientSession:
        key = proxy.url if proxy else None
        session = self._sessions.get(key)
        if session is None or session.closed:
            session = self._sessions[key] = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),  # bounded by the attempt instead
                connector=proxy.connector() if proxy else direct_connector(),
                cookie_jar=aiohttp.DummyCookieJar(),  # clients' cookies pass in headers, never mixed between them
            )
        return session

    def request(self, target: Target, method: str, url: str, headers: list[tuple[str, str]], **kwargs):
        """aiohttp's request (an awaitable and async context manager), through the target's outbound proxy if any."""
        proxy = target.proxy
        if proxy is not None:
            headers, options = proxy.request_options(url, headers)
            kwargs.update(options)
        return self.session(proxy).request(method, url, headers=headers, allow_redirects=False, **kwargs)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


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


def classify_exception(exc: BaseException) -> Classification:
    """Judge an attempt that raised before a complete answer arrived. Unknown exceptions are bugs: re-raised."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return Classification(Verdict.RETRY, "no response from upstream in time", Failure.TIMEOUT)
    # An outbound proxy that refuses, resets or cannot reach the upstream fails the attempt like the network would.
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return Classification(Verdict.RETRY, f"cannot connect to proxy {exc.host}:{exc.port} ({_reason(exc)})", Failure.NETWORK)
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return Classification(Verdict.RETRY, f"proxy answered {exc.status} {exc.message} to CONNECT", Failure.NETWORK)
    if isinstance(exc, (aiohttp_socks.ProxyError, aiohttp_socks.ProxyConnectionError, aiohttp_socks.ProxyTimeoutError)):
        return Classification(Verdict.RETRY, f"SOCKS proxy: {exc}", Failure.NETWORK)
    if isinstance(exc, asyncio.IncompleteReadError):
        return Classification(Verdict.RETRY, "SOCKS proxy: it closed the connection during its handshake", Failure.NETWORK)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Classification(
            Verdict.RETRY, f"cannot connect to upstream {exc.host}:{exc.port} ({_reason(exc)})", Failure.NETWORK
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Classification(Verdict.RETRY, "upstream closed the connection without answering", Failure.NETWORK)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Classification(Verdict.RETRY, "upstream broke off its answer", Failure.NETWORK)
    if isinstance(exc, aiohttp.ClientResponseError):
        return Classification(Verdict.RETRY, f"upstream sent an invalid HTTP answer ({exc.message})", Failure.BROKEN)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return Classification(Verdict.RETRY, f"network error talking to upstream ({exc})", Failure.NETWORK)
    raise exc


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    return os.strerror(os_error.errno) if os_error and os_error.errno else str(os_error or exc)
