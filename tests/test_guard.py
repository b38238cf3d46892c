"""The access guard: a refused request costs nothing. It is answered from its headers, before its body is read, and
the body is never held — measured on a real `mitmdump` with hundreds of MB sent by a raw socket client."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import CHAT, call, chat
from seaking.lab.fault_upstream import REPLY_TEXT
from test_streaming import read_stream

ACCESS_KEY = "access-key-for-guard-tests"
UPSTREAM_KEY = "sk-upstream-key-for-guard-tests"
LIMIT = 1024 * 1024
BIG = 300 * 1024 * 1024
BLOB = b"x" * (1024 * 1024)
GUARDED = {"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": ACCESS_KEY, "max_body_bytes": LIMIT}}


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    return status, json.loads(await reader.readexactly(length))


@pytest.mark.parametrize(
    ("case", "key", "framing", "status", "code"),
    [
        ("wrong access key", "wrong-key-0123456789", f"Content-Length: {BIG}", 401, "invalid_access_key"),
        ("declared over the limit", ACCESS_KEY, f"Content-Length: {BIG}", 413, "request_too_large"),
        ("chunked over the limit", ACCESS_KEY, "Transfer-Encoding: chunked", 413, "request_too_large"),
    ],
)
async def test_a_refused_body_is_never_held(mitmdump, upstream, tmp_path, case, key, framing, status, code):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**GUARDED, "health_check": {"interval": 0}}))  # no probe: count requests
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    port = int((await proxy.start()).rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    before = memory_kib(proxy.process.pid)
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )
    chunked = "chunked" in framing
    answer = asyncio.create_task(read_answer(reader))
    if not chunked:  # answered from the headers alone, before a byte of the body
        async with asyncio.timeout(5):
            await asyncio.shield(answer)
    sent, sent_at_answer = 0, None
    async with asyncio.timeout(60):
        while sent < BIG:  # a client that sends it all anyway
            writer.write(b"%x\r\n%s\r\n" % (len(BLOB), BLOB) if chunked else BLOB)
            await writer.drain()
            await asyncio.sleep(0)  # let the answer in as soon as it comes
            sent += len(BLOB)
            if sent_at_answer is None and answer.done():
                sent_at_answer = sent
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        answered_status, document = await answer
    writer.close()
    after = memory_kib(proxy.process.pid)
    assert (answered_status, document["error"]["code"]) == (status, code)
    if chunked:  # cut off at the limit: answered long before the client had sent it all
        assert sent_at_answer is not None and sent_at_answer <= LIMIT + 8 * len(BLOB)
    assert after["VmHWM"] - before["VmRSS"] < 48 * 1024, (before, after)  # 300 MB sent; not even 48 MB held
    assert upstream.received == []


async def test_a_chunked_body_under_the_limit_is_answered_normally(proxy_factory, upstream, client):
    proxy = await proxy_factory(GUARDED)
    headers = {"Authorization": f"Bearer {ACCESS_KEY}", "Content-Type": "application/json"}

    async def body(document: dict):
        text = json.dumps(document).encode()
        yield text[:10]
        yield text[10:]

    answer = await call(client, "POST", proxy.url + "/v1//chat/completions", data=body(CHAT), headers=headers)
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    assert answer.headers["x-seaking-attempts"] == "1"
    [received] = upstream.received
    assert (received.path, received.json(), received.headers["Authorization"]) == (
        "/v1/chat/completions", CHAT, f"Bearer {UPSTREAM_KEY}")
    flow = proxy.flows[-1]
    assert flow.request.url == upstream.url + "/v1/chat/completions"  # not the relay
    assert json.loads(flow.request.content) == CHAT
    assert "x-seaking-relay" not in flow.request.headers

    streamed = await call(
        client, "POST", proxy.url + "/v1/chat/completions", data=body({**CHAT, "stream": True}), headers=headers
    )
    assert streamed.status == 200 and b"data: [DONE]" in streamed.body and b"upstream" in streamed.body

    not_json = await call(client, "POST", proxy.url + "/v1/chat/completions", data=body_bytes(b"{nope"), headers=headers)
    assert (not_json.status, not_json.error["code"]) == (400, "invalid_json")
    assert len(upstream.received) == 2


async def body_bytes(data: bytes):
    yield data


async def test_a_refused_flow_shows_what_was_refused_and_no_key(proxy_factory, upstream, client):
    proxy = await proxy_factory(GUARDED)
    answer = await chat(client, proxy, headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert (answer.status, answer.error["code"]) == (401, "invalid_access_key")
    flow = proxy.flows[-1]
    assert flow.metadata["seaking"]["refused"] == "invalid_access_key"
    assert flow.request.url == upstream.url + "/v1/chat/completions"  # as mitmproxy shows it, not the relay
    assert flow.request.headers["authorization"] == "Bearer [redacted]"
    assert upstream.received == []
    # and the next request on the same connection is served as usual
    good = await chat(client, proxy, headers={"Authorization": f"Bearer {ACCESS_KEY}"})
    assert good.status == 200


async def test_a_refused_stream_request_is_refused_the_same_way(proxy_factory, upstream, client):
    proxy = await proxy_factory(GUARDED)
    read = await read_stream(client, proxy)  # with a key that is not the access key
    assert read.status == 401
    assert upstream.received == []
