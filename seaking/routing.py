"""Where a client's request goes upstream. Pure.

SillyTavern builds URLs by concatenating its custom_url with the endpoint, so the same call arrives as
/v1/chat/completions, /chat/completions or /v1//chat/completions depending on how the user typed the URL. Known API
endpoints are mapped onto the target base whatever the prefix; every other path goes to the target host unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

JSON_ENDPOINTS = frozenset({"chat/completions", "completions", "messages", "embeddings"})
MODELS_ENDPOINT = "models"
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


def route(base_url: str, path: str) -> Route:
    """Map a request path (with query) onto the target base URL.

    A base with a path (https://h/api/v1) receives the bare endpoint: /v1//chat/completions -> https://h/api/v1/chat/completions.
    A base without one (the plain --mode reverse target) receives the client's path with its slashes tidied, so a
    /v1 the client sent is kept.
    """
    raw_path, sep, query = path.partition("?")
    suffix = sep + query
    tidy = re.sub(r"/{2,}", "/", raw_path).strip("/")
    endpoint = _VERSION_PREFIX.sub("", tidy, count=1)
    base = urlsplit(base_url)
    origin = f"{base.scheme}://{base.netloc}"
    if endpoint not in JSON_ENDPOINTS and endpoint != MODELS_ENDPOINT:
        return Route(url=origin + raw_path + suffix, endpoint=None)
    base_path = base.path.rstrip("/")
    upstream_path = f"{base_path}/{endpoint}" if base_path else f"/{tidy}"
    return Route(url=origin + upstream_path + suffix, endpoint=endpoint)
