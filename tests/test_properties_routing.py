"""Property tests for routing.py: any client path maps onto the target base without losing its query or leaving the
target's host. Profiles (how many examples) are in conftest.py; the cases they found are plain tests at the end."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import yarl
from hypothesis import example, given
from hypothesis import strategies as st

from seaking.config import parse_config
from seaking.routing import ANTHROPIC_ENDPOINTS, JSON_ENDPOINTS, MODELS_ENDPOINT, endpoint_of, route

ENDPOINTS = sorted(JSON_ENDPOINTS | {MODELS_ENDPOINT})

# Bases as config.yaml accepts them: http(s), a host name, IPv4 or IPv6 address, maybe a port, maybe a path.
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
base_paths = st.one_of(
    st.just(""),
    st.just("/"),
    st.lists(st.sampled_from(["v1", "api", "openai", "v1beta", "studio", "x y", "%2F", "@", ":"]), min_size=1, max_size=3).map(
        lambda segments: "/" + "/".join(segments)
    ),
).flatmap(lambda path: st.sampled_from([path, path + "/"]) if path not in ("", "/") else st.just(path))
bases = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    base_paths,
)

# Client paths: pieces that make up real and hostile request targets, glued together, and anything at all.
PIECES = [
    "/", "//", "///", "v1", "/v1", "v1/", "chat", "completions", "messages", "count_tokens", "models", "embeddings",
    "evil.example", "//evil.example", "/\\evil.example", "\\\\evil.example", "@evil.example", "user:pw@evil.example",
    ":8080", ".evil.example", "%2F%2Fevil.example", "%2f", "%40", "%5C", "..", ".", "?", "??", "&", "=", "#", "*",
    "http://evil.example", "https:", ";", " ", "\t", "~", "%", "%zz", "ü", "\u3002", "\uff0e", "\x00", "\x7f",
]
client_paths = st.one_of(
    st.lists(st.one_of(st.sampled_from(PIECES), st.sampled_from(ENDPOINTS)), max_size=8).map("".join),
    st.builds(
        lambda prefix, endpoint, query: prefix + endpoint + query,
        st.sampled_from(["", "/", "//", "/v1/", "/v1//", "//v1//", "v1/", "/api/v1/"]),
        st.sampled_from(ENDPOINTS),
        st.one_of(st.just(""), st.text(max_size=20).map(lambda q: "?" + q)),
    ),
    st.text(max_size=30),
)


def query_of(url_or_path: str) -> str:
    """The query as the HTTP client will send it: after the first ?, before any #."""
    return url_or_path.partition("#")[0].partition("?")[2]


def same_origin(url: str, base: str) -> None:
    """Both URL parsers involved agree that `url` is on the base's scheme, host and port: urllib's (config.py,
    targets.py) and yarl's (aiohttp, which sends the attempts)."""
    got, want = urlsplit(url), urlsplit(base)
    assert (got.scheme, got.hostname, got.port) == (want.scheme, want.hostname, want.port)
    got, want = yarl.URL(url), yarl.URL(base)
    assert (got.scheme, got.host, got.port) == (want.scheme, want.host, want.port)


@given(base=bases, path=client_paths)
@example(base="https://h", path="*")  # OPTIONS * HTTP/1.1: mitmproxy's request.path is "*"
@example(base="https://h:8443/v1", path="@evil.example/x")
def test_any_path_stays_on_the_base_with_its_query(base, path):
    assert parse_config({"target_proxy": {"url": base}}, environ={})  # a base config.yaml accepts
    result = route(base, path)
    same_origin(result.url, base)
    assert query_of(result.url) == query_of(path)
    assert result.endpoint == endpoint_of(path.partition("?")[0])
    if result.endpoint is None:  # any other path goes to the base's host as it came, with a leading slash
        origin = f"{urlsplit(base).scheme}://{urlsplit(base).netloc}"
        assert result.url == origin + ("" if path.startswith("/") else "/") + path


@given(base=bases, prefix=st.sampled_from(["", "/", "//", "/v1", "/v1/", "//v1//", "v1/"]), endpoint=st.sampled_from(ENDPOINTS),
       slashes=st.sampled_from(["", "/", "//"]), query=st.one_of(st.just(""), st.text(max_size=20).map(lambda q: "?" + q)))
def test_known_endpoints_land_under_the_base_path(base, prefix, endpoint, slashes, query):
    path = prefix + ("/" if prefix and not prefix.endswith("/") else "") + endpoint + slashes + query
    result = route(base, path)
    assert result.endpoint == endpoint
    base_path = urlsplit(base).path.rstrip("/")
    url_path = result.url.partition("?")[0].partition("#")[0]
    origin = f"{urlsplit(base).scheme}://{urlsplit(base).netloc}"
    if base_path:
        assert url_path == f"{origin}{base_path}/{endpoint}"
    elif endpoint in ANTHROPIC_ENDPOINTS:
        assert url_path == f"{origin}/v1/{endpoint}"
    else:  # the client's /v1 kept, its slashes tidied
        assert url_path in (f"{origin}/{endpoint}", f"{origin}/v1/{endpoint}")
    assert query_of(result.url) == query_of(query)


# Cases the properties found, written out.


@pytest.mark.parametrize(
    ("base", "path", "url"),
    [
        # A request target that did not start with "/" was glued onto the host: the host, the port or the whole
        # authority changed, or the URL could not be parsed at all. Hypothesis's minimal cases first.
        ("http://0.0.0.0", "0", "http://0.0.0.0/0"),  # was http://0.0.0.00: another host
        ("http://0.0.0.0:1", ":", "http://0.0.0.0:1/:"),  # was http://0.0.0.0:1: (port "1:")
        ("http://0.0.0.0", "[", "http://0.0.0.0/["),  # was http://0.0.0.0[ ("Invalid IPv6 URL")
        ("http://[::]", "\\\\evil.example", "http://[::]/\\\\evil.example"),  # yarl: a backslash in the authority
        # The ones a client can send: mitmproxy accepts "OPTIONS * HTTP/1.1" and gives request.path "*".
        ("https://h", "*", "https://h/*"),
        ("https://h:8443/v1", "@evil.example/x", "https://h:8443/@evil.example/x"),
        ("https://h", ".evil.example/x?q=1", "https://h/.evil.example/x?q=1"),
    ],
)
def test_a_path_without_a_leading_slash_stays_on_the_host(base, path, url):
    assert route(base, path).url == url
    same_origin(url, base)
