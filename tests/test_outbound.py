"""Outbound proxies: requests to the upstream through a real HTTP, HTTPS or SOCKS5 proxy — mitmproxy itself, as a
`mitmdump --mode regular` or `--mode socks5` subprocess that records what passes through it — chosen per target or
from HTTPS_PROXY/HTTP_PROXY/NO_PROXY; a proxy that refuses or resets fails the attempt like the network would; the
proxy's password never shows."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import ssl
from pathlib import Path

import aiohttp_socks
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs, io

from conftest import CHAT, FAST_POLICY, call, chat, merge
from retry_policy import Failure, Verdict
from seaking.connections import classify_exception
from seaking.lab.fault_upstream import FaultyUpstream
from seaking.config import ConfigError, parse_config
from seaking.outbound import OutboundProxy, proxy_for, proxy_problem, shown_url

PASSWORD = "proxy-pass-8d1f77"
USER = "seaking"


# --- pure: which proxy a target takes ----------------------------------------------------------------------------


@pytest.fixture
def environment(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_a_configured_proxy_wins_over_the_environment(environment):
    environment.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    assert proxy_for("https://api.example/v1", "socks5h://u:p@127.0.0.1:1080") == OutboundProxy("socks5h://u:p@127.0.0.1:1080")


@pytest.mark.parametrize(
    ("variables", "target", "expected"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.example/v1", "http://p:3128"),
        ({"HTTPS_PROXY": "http://p:3128"}, "http://api.example/v1", None),  # HTTPS_PROXY is for https:// targets
        ({"HTTP_PROXY": "socks5://p:1080"}, "http://api.example", "socks5://p:1080"),
        ({"ALL_PROXY": "socks5h://p:1080"}, "https://api.example", "socks5h://p:1080"),
        ({"HTTPS_PROXY": "http://p:1", "ALL_PROXY": "http://q:2"}, "https://api.example", "http://p:1"),
        ({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}, "https://api.example", "http://lower:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "localhost,api.example"}, "https://api.example/v1", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example"}, "https://eu.api.example", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.example"}, "https://api.example", "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "https://api.example", None),
        ({"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1:8000"}, "http://127.0.0.1:8000", None),
    ],
)
def test_the_environment_names_the_proxy_as_curl_reads_it(environment, variables, target, expected):
    for name, value in variables.items():
        environment.setenv(name, value)
    found = proxy_for(target, None)
    assert (found.url if found else None) == expected


def test_an_unusable_proxy_in_the_environment_is_named_without_its_password(environment):
    environment.setenv("HTTPS_PROXY", f"socks4://{USER}:{PASSWORD}@p:1080")
    with pytest.raises(ValueError, match=r"https_proxy \(HTTPS_PROXY\): must be a http://, https://, socks5://, socks5h:// URL") as e:
        proxy_for("https://api.example", None)
    assert PASSWORD not in str(e.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:3128", None),
        (f"socks5h://{USER}:{PASSWORD}@proxy.lan", None),
        ("127.0.0.1:7890", "must be a http://, https://, socks5://, socks5h:// URL with a host"),
        (f"ftp://{USER}:{PASSWORD}@p", "must be a http://, https://, socks5://, socks5h:// URL with a host, got 'ftp://p'"),
        ("http://p:99999", "has an invalid port"),
        ("http://p:3128/path", "must be scheme://[user:password@]host[:port] only"),
    ],
)
def test_proxy_urls_are_checked(url, problem):
    found = proxy_problem(url)
    assert found == problem if problem is None else problem in found
    assert PASSWORD not in (found or "")


def test_a_bad_proxy_key_stops_start_up_naming_it():
    with pytest.raises(ConfigError, match=r"targets\[1\]\.proxy: must be a http://"):
        parse_config({"targets": [{"url": "https://a.example"}, {"url": "https://b.example", "proxy": "socks4://p:1"}]})


def test_what_is_shown_of_a_proxy():
    proxy = OutboundProxy(f"http://{USER}:{PASSWORD}@127.0.0.1:3128")
    assert proxy.shown == shown_url(proxy.url) == "http://127.0.0.1:3128"
    assert proxy.password == PASSWORD
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers, options = proxy.request_options("https://api.example/v1/models", [("a", "b")])
    assert (headers, options) == ([("a", "b")], {"proxy": proxy.shown, "proxy_headers": {"Proxy-Authorization": expected}})
    headers, options = proxy.request_options("http://api.example/v1/models", [("a", "b")])  # no CONNECT
    assert (headers, options) == ([("a", "b"), ("Proxy-Authorization", expected)], {"proxy": proxy.shown})
    assert OutboundProxy("socks5h://127.0.0.1").request_options("http://a", []) == ([], {})


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp_socks.ProxyConnectionError("Could not connect to proxy 127.0.0.1:9 [Connection refused]"),
        aiohttp_socks.ProxyError("Connection closed unexpectedly"),
        aiohttp_socks.ProxyTimeoutError("Proxy connection timed out: 60"),
        asyncio.IncompleteReadError(b"", 2),  # escapes from aiohttp-socks when the proxy closes mid-handshake
    ],
)
def test_socks_proxy_failures_are_network_failures(exc):
    classification = classify_exception(exc)
    assert (classification.verdict, classification.failure) == (Verdict.RETRY, Failure.NETWORK)
    assert classification.detail.startswith("SOCKS proxy: ")


# --- real proxies: mitmproxy as an HTTP, HTTPS and SOCKS5 proxy ----------------------------------------------------


class OutboundMitmproxy:
    """`mitmdump --mode regular|socks5` with a password, recording every request that passes through it."""

    def __init__(self, mitmdump, tmp_path: Path, mode: str) -> None:
        self.recording = tmp_path / f"through-{mode}.mitm"
        self.confdir = tmp_path / f"conf-{mode}"
        self.process = mitmdump(
            "--mode", mode, "--set", f"proxyauth={USER}:{PASSWORD}", "--set", f"confdir={self.confdir}",
            "-w", str(self.recording), addon=False,
        )
        self.port: int | None = None

    async def start(self) -> OutboundMitmproxy:
        self.port = int((await self.process.start()).rsplit(":", 1)[1])
        return self

    def url(self, scheme: str, password: str = PASSWORD) -> str:
        return f"{scheme}://{USER}:{password}@127.0.0.1:{self.port}"

    async def passed_through(self) -> list[str]:
        """The URLs of the requests that went through it (it is stopped to read its recording)."""
        await self.process.stop()
        with self.recording.open("rb") as fh:
            return [flow.request.url for flow in io.FlowReader(fh).stream()]

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"


@pytest.fixture
async def outbound(mitmdump, tmp_path):
    async def start(mode: str) -> OutboundMitmproxy:
        return await OutboundMitmproxy(mitmdump, tmp_path, mode).start()

    return start


@pytest.mark.parametrize(("mode", "scheme"), [("regular", "http"), ("socks5", "socks5"), ("socks5", "socks5h")])
async def test_a_configured_proxy_carries_the_requests(proxy_factory, upstream, client, outbound, mode, scheme):
    through = await outbound(mode)
    proxy = await proxy_factory({"target_proxy": {"proxy": through.url(scheme)}})
    answer = await chat(client, proxy)
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"]
    streamed = await call(client, "POST", proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    status = (await call(client, "GET", proxy.url + "/_seaking/status")).json()
    assert status["targets"][0]["proxy"] == f"{scheme}://127.0.0.1:{through.port}"
    assert PASSWORD not in json.dumps(status)
    assert await through.passed_through() == [f"{upstream.url}/v1/chat/completions"] * 2


async def test_each_target_its_own_proxy_and_a_refusing_proxy_fails_over(proxy_factory, upstream, upstream_factory, client, outbound):
    backup = await upstream_factory()
    through = await outbound("socks5")
    refusing = f"http://{USER}:{PASSWORD}@127.0.0.1:{closed_port()}"
    proxy = await proxy_factory({
        "target_proxy": {"proxy": refusing},
        "targets": [{"url": backup.url, "proxy": through.url("socks5h")}],
    })
    answer = await chat(client, proxy)
    assert (answer.status, answer.headers["x-seaking-target"]) == (200, f"127.0.0.1:{backup.port}")
    assert upstream.received == []  # the primary could not be reached through its proxy
    first = proxy.flows[-1].metadata["seaking"]["attempts"][0]
    assert first["failure"] == "network" and first["detail"].startswith("cannot connect to proxy 127.0.0.1:")
    assert PASSWORD not in repr(proxy.flows[-1].metadata) + (proxy.flows[-1].comment or "")
    assert await through.passed_through() == [f"{backup.url}/v1/chat/completions"]


class ResettingProxy:
    """A proxy that accepts connections and closes them at once, before any answer."""

    async def start(self) -> str:
        async def reset(reader, writer):
            writer.transport.abort()

        self.server = await asyncio.start_server(reset, "127.0.0.1", 0)
        return str(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
async def test_a_proxy_that_resets_is_a_network_failure_and_retried(proxy_factory, client, scheme):
    resetting = ResettingProxy()
    port = await resetting.start()
    try:
        proxy = await proxy_factory({"target_proxy": {"proxy": f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{port}"}, "error_handling": {"max_retries": 2}})
        answer = await chat(client, proxy)
    finally:
        await resetting.stop()
    assert answer.status == 502
    assert (answer.error["code"], answer.error["attempts"]) == ("upstream_unreachable", 3)
    assert PASSWORD not in answer.body.decode()
    assert all(a["failure"] == "network" for a in proxy.flows[-1].metadata["seaking"]["attempts"])


async def test_a_wrong_proxy_password_is_a_failed_attempt_that_says_so(proxy_factory, client, outbound):
    through = await outbound("socks5")
    proxy = await proxy_factory({"target_proxy": {"proxy": through.url("socks5", password="wrong-pass-1234")}, "error_handling": {"max_retries": 0}})
    answer = await chat(client, proxy)
    assert (answer.status, answer.error["code"]) == (502, "upstream_unreachable")
    assert "SOCKS proxy" in answer.error["message"] and "wrong-pass-1234" not in answer.body.decode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the environment, in the command users run -----------------------------------------------------------------


async def start_seaking(mitmdump, upstream, tmp_path, env: dict, config: dict | None = None) -> tuple:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merge(FAST_POLICY, config or {})))
    seaking = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={path}", "--set", "flow_detail=4", env=env)
    return seaking, await seaking.start()


async def test_http_proxy_from_the_environment_and_no_proxy(mitmdump, upstream, client, outbound, tmp_path):
    through = await outbound("regular")
    proxied, url = await start_seaking(mitmdump, upstream, tmp_path, {"HTTP_PROXY": through.url("http")})
    assert (await call(client, "POST", url + "/v1/chat/completions", json=CHAT)).status == 200
    await proxied.stop()
    direct, url = await start_seaking(mitmdump, upstream, tmp_path, {"HTTP_PROXY": through.url("http"), "NO_PROXY": "localhost,127.0.0.1"})
    assert (await call(client, "POST", url + "/v1/chat/completions", json=CHAT)).status == 200
    await direct.stop()
    assert await through.passed_through() == [f"{upstream.url}/v1/chat/completions"]  # the first only
    assert PASSWORD not in proxied.output + direct.output


async def test_an_https_proxy_from_the_environment(mitmdump, upstream, client, outbound, tmp_path):
    through = await outbound("regular")
    env = {"HTTP_PROXY": through.url("https"), "SSL_CERT_FILE": str(through.ca)}  # trust the proxy's own certificate
    seaking, url = await start_seaking(mitmdump, upstream, tmp_path, env)
    assert (await call(client, "POST", url + "/v1/chat/completions", json=CHAT)).status == 200
    await seaking.stop()
    assert await through.passed_through() == [f"{upstream.url}/v1/chat/completions"]


def tls_upstream_context(confdir: Path) -> ssl.SSLContext:
    """A server certificate for 127.0.0.1, signed by the CA in `confdir` (made there if need be: the outbound
    mitmproxy of the same confdir uses it too)."""
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    entry = store.get_cert("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    chain = confdir / "upstream.pem"
    chain.write_bytes(entry.cert.to_pem() + key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return context


async def test_an_https_upstream_through_an_http_proxy_with_credentials(mitmdump, client, tmp_path):
    """The CONNECT path: the proxy's credentials go with the CONNECT, the TLS is end to end (mitmproxy, as the
    outbound proxy here, decrypts it only to record it)."""
    confdir = tmp_path / "conf"
    upstream = FaultyUpstream()
    await upstream.start(ssl_context=tls_upstream_context(confdir))
    try:
        ca = str(confdir / "mitmproxy-ca-cert.pem")
        recording = tmp_path / "through.mitm"
        through = mitmdump("--mode", "regular", "--set", f"proxyauth={USER}:{PASSWORD}", "--set", f"confdir={confdir}",
                           "--set", f"ssl_verify_upstream_trusted_ca={ca}", "-w", str(recording), addon=False)
        port = (await through.start()).rsplit(":", 1)[1]
        env = {"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@127.0.0.1:{port}", "SSL_CERT_FILE": ca}
        seaking, url = await start_seaking(mitmdump, upstream, tmp_path, env)
        answer = await call(client, "POST", url + "/v1/chat/completions", json=CHAT)
        await seaking.stop()
        await through.stop()
    finally:
        await upstream.stop()
    assert answer.status == 200 and answer.headers["x-seaking-target"] == f"127.0.0.1:{upstream.port}"
    with recording.open("rb") as fh:
        assert [f.request.url for f in io.FlowReader(fh).stream()] == [f"{upstream.url}/v1/chat/completions"]
    assert "Proxy-Authorization" not in upstream.received[0].headers


async def test_a_proxy_password_never_shows_in_logs_or_recordings(mitmdump, upstream, client, tmp_path):
    recording = tmp_path / "seaking.mitm"
    refusing = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{closed_port()}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merge(FAST_POLICY, {"target_proxy": {"proxy": refusing}, "error_handling": {"max_retries": 1}})))
    seaking = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={path}", "--set", "flow_detail=4",
                       "-w", str(recording))
    url = await seaking.start()
    answer = await call(client, "POST", url + "/v1/chat/completions", json=CHAT)
    status = await call(client, "GET", url + "/_seaking/status")
    await seaking.stop()
    assert answer.status == 502 and "SOCKS proxy" in answer.error["message"]
    assert "SOCKS proxy" in seaking.output  # the failure is logged ...
    for text in (seaking.output, answer.body.decode(), status.body.decode(), recording.read_bytes().decode("latin-1")):
        assert PASSWORD not in text  # ... without the password
