"""connections.py alone: what the HTTP client's exceptions mean for a retry, and the headers a request goes upstream
with."""

from __future__ import annotations

import aiohttp
import pytest

from retry_policy import Failure, Verdict
from seaking.connections import classify_exception, upstream_headers


def _connector_error(errno: int) -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, OSError(errno, "ignored"))


@pytest.mark.parametrize(
    ("exc", "failure", "words"),
    [
        (TimeoutError(), Failure.TIMEOUT, "in time"),
        (_connector_error(111), Failure.NETWORK, "cannot connect to upstream h:1 (Connection refused)"),
        (aiohttp.ServerDisconnectedError(), Failure.NETWORK, "closed the connection"),
        (aiohttp.ClientPayloadError("x"), Failure.NETWORK, "broke off"),
        (ConnectionResetError(104, "reset"), Failure.NETWORK, "network error"),
        (aiohttp.ClientResponseError(None, (), message="bad status line"), Failure.BROKEN, "bad status line"),
        (aiohttp.ClientHttpProxyError(None, (), status=407, message="Proxy Authentication Required"), Failure.NETWORK,
         "proxy answered 407 Proxy Authentication Required to CONNECT"),
    ],
)
def test_exceptions_are_retryable_network_failures(exc, failure, words):
    result = classify_exception(exc)
    assert (result.verdict, result.failure) == (Verdict.RETRY, failure)
    assert words in result.detail


def test_unknown_exceptions_are_bugs_not_retries():
    with pytest.raises(KeyError):
        classify_exception(KeyError("bug"))


def test_the_proxys_key_replaces_the_clients_in_the_header_the_client_used():
    bearer = upstream_headers([("Authorization", "Bearer client"), ("Host", "x"), ("X-Other", "1")], "proxy-key")
    assert bearer == [("X-Other", "1"), ("Authorization", "Bearer proxy-key")]
    anthropic = upstream_headers([("x-api-key", "client"), ("anthropic-version", "2023-06-01")], "proxy-key")
    assert anthropic == [("anthropic-version", "2023-06-01"), ("x-api-key", "proxy-key")]
    assert upstream_headers([("Authorization", "Bearer client")], None) == [("Authorization", "Bearer client")]
