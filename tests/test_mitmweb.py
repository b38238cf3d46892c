"""mitmweb as it is used: `mitmweb -s addon.py`, headless, read through its own HTTP API (what its page shows)."""

from __future__ import annotations

import asyncio
from io import BytesIO
import json

import aiohttp
import pytest
import yaml
from mitmproxy import io
from mitmproxy.utils.emoji import emoji

from conftest import call
from seaking.lab.fault_upstream import Status, Stream
from seaking.lab.harness import free_port

WEB_PASSWORD = "seaking-test-web-password"  # mitmweb >= 11.1 wants a token; 11.0.2 ignores the option
CLIENT_KEY = "sk-client-key-in-mitmweb-0001"
XSRF = "seaking-xsrf"
# Non-GET calls need mitmweb's XSRF double submit; the cookie's name changed in 12.2.3.
XSRF_HEADERS = {"X-XSRFToken": XSRF, "Cookie": f"_xsrf={XSRF}; _mitmproxy_xsrf={XSRF}"}


class Web:
    """mitmweb's HTTP API, as its page calls it."""

    def __init__(self, client: aiohttp.ClientSession, port: int) -> None:
        self.client, self.url = client, f"http://127.0.0.1:{port}"
        self.auth = {"token": WEB_PASSWORD}

    async def flows(self) -> list[dict]:
        return (await call(self.client, "GET", self.url + "/flows", params=self.auth)).json()

    async def dump(self) -> bytes:
        return (await call(self.client, "GET", self.url + "/flows/dump", params=self.auth)).body

    async def replay(self, flow_id: str) -> int:
        answer = await call(self.client, "POST", f"{self.url}/flows/{flow_id}/replay", params=self.auth, headers=XSRF_HEADERS)
        return answer.status


@pytest.fixture
async def mitmweb(mitmdump, upstream, client, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"error_handling": {"base_delay": 0.01, "max_delay": 0.05}, "health_check": {"interval": 0}}))
    web_port = free_port()
    process = mitmdump(
        "--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}", "--no-web-open-browser",
        "--web-host", "127.0.0.1", "--web-port", str(web_port), "--set", f"web_password={WEB_PASSWORD}",
        program="mitmweb",
    )
    proxy_url = await process.start()
    web = Web(client, web_port)
    async with asyncio.timeout(20):  # the web server may come up just after the proxy
        while True:
            try:
                await web.flows()
                break
            except (aiohttp.ClientError, json.JSONDecodeError):
                await asyncio.sleep(0.1)
    return proxy_url, web


def marked(flow: dict, shortcode: str) -> bool:
    """mitmweb's list shows the emoji (its JSON has the emoji on 11, the shortcode on some versions)."""
    return flow["marked"] in (shortcode, emoji[shortcode])


def is_attempt(flow: dict) -> bool:
    return flow["comment"].startswith("attempt ")


async def settle(web: Web, count: int) -> list[dict]:
    async with asyncio.timeout(10):
        while len(flows := await web.flows()) < count:
            await asyncio.sleep(0.05)
    return flows


async def test_mitmweb_shows_marks_comments_and_attempt_flows_without_a_key(mitmweb, upstream, client):
    proxy_url, web = mitmweb
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    chat = {"model": "model-a", "messages": [{"role": "user", "content": "Hi"}]}
    upstream.script("chat/completions", Status(503), Status(503))
    assert (await call(client, "POST", proxy_url + "/v1/chat/completions", json=chat, headers=headers)).status == 200
    upstream.script("chat/completions", Stream(chunks=["a", "b", "c"], drop_after=1))
    await call(client, "POST", proxy_url + "/v1/chat/completions", json={**chat, "stream": True}, headers=headers)
    assert (await call(client, "POST", proxy_url + "/v1/chat/completions", json=chat, headers=headers)).status == 200
    flows = await settle(web, 7)  # three client flows, four attempt flows: a first-time answer gets none

    retried, dropped, plain = [f for f in flows if not is_attempt(f)]
    attempts = [f for f in flows if is_attempt(f)]
    assert marked(retried, ":repeat:") and retried["comment"].startswith("3 attempts: 503, 503, 200 in ")
    assert marked(dropped, ":x:") and dropped["response"]["status_code"] == 200
    assert dropped["comment"].startswith("1 attempt: 200, stream broke after 1 char in ")
    assert dropped["server_conn"]["address"] == ["127.0.0.1", upstream.port]  # the upstream, not the relay
    assert plain["marked"] == "" and plain["comment"].endswith(", 1 → 3 tokens")  # no mark, only what it cost
    assert [a["comment"].split(" (")[0] for a in attempts] == [
        "attempt 1 of 3: 503 → retry", "attempt 2 of 3: 503 → retry", "attempt 3 of 3: 200 → success",
        f"attempt 1 of 1: 200, stream broke after 1 char in {attempts[-1]['comment'].split(' in ')[1]}",
    ]
    assert all(marked(a, ":arrow_right_hook:") and a["request"]["port"] == upstream.port for a in attempts)
    assert attempts[-1]["error"]["msg"].startswith("upstream connection dropped in the middle of the stream")

    dump = await web.dump()
    assert CLIENT_KEY not in json.dumps(flows) and CLIENT_KEY.encode() not in dump
    recorded = list(io.FlowReader(BytesIO(dump)).stream())
    by_id = {f.id: f for f in recorded}
    for flow in recorded:
        parent = flow.metadata["seaking"].get("attempt_of")
        if parent:
            assert flow.id in [a["flow"] for a in by_id[parent].metadata["seaking"]["attempts"]]


async def test_replay_in_mitmweb_goes_through_the_proxy(mitmweb, upstream, client):
    proxy_url, web = mitmweb
    chat = {"model": "model-a", "messages": [{"role": "user", "content": "Hi"}]}
    answer = await call(client, "POST", proxy_url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert answer.status == 200
    [flow] = await settle(web, 1)
    upstream.script("chat/completions", Status(503))
    assert await web.replay(flow["id"]) == 200
    async with asyncio.timeout(10):
        while not (replayed := next(f for f in await web.flows() if f["id"] == flow["id"]))["comment"]:
            await asyncio.sleep(0.05)
    assert replayed["is_replay"] == "request" and replayed["response"]["status_code"] == 200
    assert marked(replayed, ":repeat:") and replayed["comment"].startswith("2 attempts: 503, 200 in ")
    assert [r.headers["Authorization"] for r in upstream.received] == [f"Bearer {CLIENT_KEY}"] * 3
