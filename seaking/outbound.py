"""Outbound proxies: which proxy, if any, a target's requests go through, and how aiohttp goes through it.

Many users reach their upstream only through a local HTTP or SOCKS5 proxy (Clash, v2ray, a corporate proxy). A target
takes the `proxy` of its section in config.yaml; without one, the proxy the environment names for the target's scheme,
as curl does: HTTPS_PROXY for https:// targets, HTTP_PROXY for http:// ones, ALL_PROXY for either, none for a host that
NO_PROXY lists (host names and domain suffixes, `*` for all; urllib's rules). http:// and https:// proxies are aiohttp's
own (CONNECT for https targets); socks5:// (names resolved here) and socks5h:// (names resolved by the proxy) go
through aiohttp-socks.

aiohttp's trust_env reads the same variables, but ignores https:// and SOCKS proxies in them and looks them up again on
every request (in a thread). Here a target's proxy is settled once, when the config is loaded, the same way for all four
kinds. A proxy's credentials stay in its URL, in memory: `shown` is what logs, the status and errors may say.
"""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiohttp
import aiohttp_socks

SCHEMES = ("http", "https", "socks5", "socks5h")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}
# What aiohttp-socks raises when a SOCKS proxy refuses, fails or times out (they are not aiohttp's ClientErrors), and
# what escapes from it when the proxy closes the connection in the middle of its handshake.
SOCKS_ERRORS = (
    aiohttp_socks.ProxyError, aiohttp_socks.ProxyConnectionError, aiohttp_socks.ProxyTimeoutError, asyncio.IncompleteReadError
)


def shown_url(url: str) -> str:
    """The proxy URL without its credentials."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def proxy_problem(url: str) -> str | None:
    """What is wrong with a proxy URL, in words that never repeat its credentials; None when it can be used."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        return f"must be a {', '.join(s + '://' for s in SCHEMES)} URL with a host, got {shown_url(url)!r}"
    try:
        parts.port
    except ValueError:
        return f"has an invalid port: {shown_url(url)!r}"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"must be scheme://[user:password@]host[:port] only, got {shown_url(url)}/..."
    return None


@dataclass(frozen=True)
class OutboundProxy:
    url: str  # as configured, credentials included: never shown

    @property
    def shown(self) -> str:
        return shown_url(self.url)

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return unquote(password) if password else None

    @property
    def is_socks(self) -> bool:
        return self.url.startswith("socks5")

    def connector(self) -> aiohttp.BaseConnector:
        """The connection pool for requests through this proxy (SOCKS tunnels are made by the connector)."""
        if not self.is_socks:
            return direct_connector()
        parts = urlsplit(self.url)
        return aiohttp_socks.ProxyConnector(
            host=parts.hostname,
            port=parts.port or _DEFAULT_PORTS[parts.scheme],
            proxy_type=aiohttp_socks.ProxyType.SOCKS5,
            username=unquote(parts.username) if parts.username else None,
            password=self.password,
            rdns=parts.scheme == "socks5h",
            limit=0,
            ttl_dns_cache=60,
        )

    def request_options(self, url: str, headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict]:
        """The headers and aiohttp's per-request arguments for a request to `url` through this proxy. SOCKS needs
        none (its connector does the work). An HTTP(S) proxy's credentials go with the CONNECT of an https:// request,
        and in a plain http:// request itself, which the proxy reads (aiohttp 3.14 deprecates proxy_auth, which did
        both, and older versions lack its replacement)."""
        if self.is_socks:
            return headers, {}
        options: dict = {"proxy": self.shown}
        parts = urlsplit(self.url)
        if parts.username:
            credentials = base64.b64encode(f"{unquote(parts.username)}:{self.password or ''}".encode()).decode()
            if url.startswith("https:"):
                options["proxy_headers"] = {"Proxy-Authorization": f"Basic {credentials}"}
            else:
                headers = [*headers, ("Proxy-Authorization", f"Basic {credentials}")]
        return headers, options


def direct_connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0, ttl_dns_cache=60)


def proxy_for(target_url: str, configured: str | None) -> OutboundProxy | None:
    """The proxy for a target: the configured one, else the environment's. Raises ValueError for an unusable
    proxy in the environment (the config's own `proxy` keys are checked with the rest of the file)."""
    if configured:
        return OutboundProxy(configured)
    parts = urlsplit(target_url)
    environment = urllib.request.getproxies_environment()
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""
    if urllib.request.proxy_bypass_environment(host, environment):
        return None
    scheme = parts.scheme if parts.scheme in environment else "all"
    url = environment.get(scheme)
    if not url:
        return None
    problem = proxy_problem(url)
    if problem:
        raise ValueError(f"environment variable {scheme}_proxy ({scheme.upper()}_PROXY): {problem}")
    return OutboundProxy(url)
