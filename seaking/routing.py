"""Where a client's request goes upstream. Pure.

SillyTavern builds URLs by concatenating its custom_url with the endpoint, so the same call arrives as
/v1/chat/completions, /chat/completions or /v1//chat/completions depending on how the user typed the URL (its Claude
source likewise: a reverse proxy URL of http://host:8080 gives //messages). Known API endpoints are mapped onto the
target base whatever the prefix; every other path goes to the target host unchanged.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# Anthropic's Messages API; it lives under /v1 only.
ANTHROPIC_ENDPOINTS = frozenset({"messages", "messages/count_tokens"})
OPENAI_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
JSON_ENDPOINTS = OPENAI_ENDPOINTS | ANTHROPIC_ENDPOINTS
MODELS_ENDPOINT = "models"
REPLY_ENDPOINTS = frozenset({"chat/completions", "completions", "messages"})  # answered with a model's reply
_VERSION_PREFIX = re.compile(r"^v1(/|$)")


@dataclass(frozen=True)
class Route:
    url: str  # the upstream URL, query included
    endpoint: str | None  # "chat/completions", "models", ...; None for paths that are not a known API endpoint

    @property
    def expects_json_body(self) -> bool:
        return self.endpoint in JSON_ENDPOINTS

    @property
    def is_models(self) -> bool:
        return self.endpoint == MODELS_ENDPOINT


@functools.lru_cache(maxsize=1024)  # a client sends the same few paths over and over
def endpoint_of(path: str) -> str | None:
    """The known API endpoint a request path (with query) names, whatever its /v1 prefix and slashes; else None."""
    endpoint = _VERSION_PREFIX.sub("", _tidy(path), count=1)
    return endpoint if endpoint in JSON_ENDPOINTS or endpoint == MODELS_ENDPOINT else None


@functools.lru_cache(maxsize=1024)
def route(base_url: str, path: str) -> Route:
    """Map a request path (with query) onto the target base URL.

    A base with a path (https://h/api/v1) receives the bare endpoint: /v1//chat/completions -> https://h/api/v1/chat/completions.
    A base without one (the plain --mode reverse target) receives the client's path with its slashes tidied, so a
    /v1 the client sent is kept; a Messages path without it gets it (//messages -> /v1/messages), as Anthropic's
    API has no other home.
    """
    raw_path, sep, query = path.partition("?")
    if not raw_path.startswith("/"):  # "*" (OPTIONS *), "@evil.example/...": not glued onto the host
        raw_path = "/" + raw_path
    suffix = sep + query
    base = urlsplit(base_url)
    origin = f"{base.scheme}://{base.netloc}"
    endpoint = endpoint_of(raw_path)
    if endpoint is None:
        return Route(url=origin + raw_path + suffix, endpoint=None)
    base_path = base.path.rstrip("/")
    if base_path:
        upstream_path = f"{base_path}/{endpoint}"
    elif endpoint in ANTHROPIC_ENDPOINTS:
        upstream_path = f"/v1/{endpoint}"
    else:
        upstream_path = f"/{_tidy(raw_path)}"
    return Route(url=origin + upstream_path + suffix, endpoint=endpoint)


def _tidy(path: str) -> str:
    return re.sub(r"/{2,}", "/", path.partition("?")[0]).strip("/")
