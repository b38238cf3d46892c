"""routing.py alone: where each client path goes upstream."""

from __future__ import annotations

import pytest

from seaking.routing import endpoint_of, route


@pytest.mark.parametrize(
    ("base", "path", "url", "endpoint"),
    [
        # A base with a path gets the bare endpoint, whatever prefix the client used.
        ("https://h/v1", "/v1/chat/completions", "https://h/v1/chat/completions", "chat/completions"),
        ("https://h/v1", "/chat/completions", "https://h/v1/chat/completions", "chat/completions"),
        ("https://h/v1", "/v1//chat/completions", "https://h/v1/chat/completions", "chat/completions"),
        ("https://h/v1/", "//v1//chat//completions/", "https://h/v1/chat/completions", "chat/completions"),
        ("https://h/api/v1/studio", "/v1/models", "https://h/api/v1/studio/models", "models"),
        ("https://h:8443/x", "/v1/completions?a=1&b=2", "https://h:8443/x/completions?a=1&b=2", "completions"),
        ("http://h/v1", "/messages", "http://h/v1/messages", "messages"),
        ("http://h/v1", "/v1/embeddings", "http://h/v1/embeddings", "embeddings"),
        # A base without a path keeps the client's tidied path, /v1 included.
        ("https://h", "/v1//chat/completions", "https://h/v1/chat/completions", "chat/completions"),
        ("https://h", "/chat/completions", "https://h/chat/completions", "chat/completions"),
        ("http://127.0.0.1:9000", "/v1/models", "http://127.0.0.1:9000/v1/models", "models"),
        # Everything else goes to the target host unchanged.
        ("https://h/v1", "/health", "https://h/health", None),
        ("https://h/v1", "/v1/models/gpt-4", "https://h/v1/models/gpt-4", None),
        ("https://h/v1", "//odd//path?q=1", "https://h//odd//path?q=1", None),
        ("https://h/v1", "/v2/chat/completions", "https://h/v2/chat/completions", None),
        ("https://h/v1", "/v1chat/completions", "https://h/v1chat/completions", None),
        ("https://h/v1", "/", "https://h/", None),
    ],
)
def test_route(base, path, url, endpoint):
    result = route(base, path)
    assert (result.url, result.endpoint) == (url, endpoint)


def test_route_kinds():
    assert route("https://h", "/v1/chat/completions").expects_json_body
    assert not route("https://h", "/v1/models").expects_json_body
    assert route("https://h", "/v1/models").is_models
    assert not route("https://h", "/health").is_models


@pytest.mark.parametrize(
    ("base", "path", "url", "endpoint"),
    [
        # Anthropic's API lives under /v1 only: a base without a path gets it even when the client left it out.
        ("https://h", "//messages", "https://h/v1/messages", "messages"),
        ("https://h", "/messages?beta=true", "https://h/v1/messages?beta=true", "messages"),
        ("https://h", "/v1/messages/count_tokens", "https://h/v1/messages/count_tokens", "messages/count_tokens"),
        ("https://h/api/v1", "/v1//messages/count_tokens", "https://h/api/v1/messages/count_tokens", "messages/count_tokens"),
        ("https://h", "/v1/messages/batches", "https://h/v1/messages/batches", None),
    ],
)
def test_route_anthropic(base, path, url, endpoint):
    result = route(base, path)
    assert (result.url, result.endpoint) == (url, endpoint)
    assert endpoint_of(path) == endpoint
