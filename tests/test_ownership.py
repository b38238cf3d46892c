"""One owner per open upstream stream: however a client's stream ends, the upstream request behind it ends with it.

Counted on the fake upstream's side: a request is open until its whole answer was written or its client (the proxy)
went away. After each ending below, none is left open, and the relay holds nothing."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from seaking.lab.fault_upstream import Delayed, Stream
from seaking.streaming import ClientStream
from test_streaming import STREAM_CHAT, read_stream

# A per-try timeout far longer than the waits below: an upstream request the proxy forgot would still be open.
FAST_STREAMS = {"streaming": {"idle_timeout": 0.3, "heartbeat_interval": 0.2}, "target_proxy": {"timeout": 10}}


async def nothing_left_open(proxy, upstream) -> None:
    """Within a moment of the client flow's end (the upstream notices a closed connection asynchronously)."""
    async with asyncio.timeout(5):
        while not proxy.flows:
            await asyncio.sleep(0.02)
    async with asyncio.timeout(1):
        while upstream.open_requests or proxy.shared.relay.pending or proxy.shared.relay.bound:
            await asyncio.sleep(0.02)
    assert len(upstream.received) == 1  # ended, not retried


async def leave_after(client, proxy, lines: int) -> None:
    """A client that reads `lines` non-empty lines of its stream, then closes the connection."""
    headers = {"Authorization": "Bearer sk-client-key-123456"}
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT, headers=headers) as response:
        seen = 0
        async for line in response.content:
            seen += bool(line.strip())
            if seen >= lines:
                response.close()
                return


@pytest.mark.parametrize(
    "ending",
    ["normal end", "drop", "idle timeout", "client leaves mid-stream", "client leaves during heartbeats", "shutdown"],
)
async def test_no_upstream_request_outlives_its_client_stream(proxy_factory, upstream, client, ending):
    proxy = await proxy_factory({**FAST_STREAMS, "server": {"shutdown_grace": 0.3}})
    words = [f"w{i} " for i in range(40)]
    if ending == "normal end":
        upstream.script("chat/completions", Stream(chunks=words))
        await read_stream(client, proxy)
    elif ending == "drop":
        upstream.script("chat/completions", Stream(chunks=words, drop_after=5))
        await read_stream(client, proxy)
    elif ending == "idle timeout":
        upstream.script("chat/completions", Stream(chunks=words, stall_after=5))
        await read_stream(client, proxy)
    elif ending == "client leaves mid-stream":
        upstream.script("chat/completions", Stream(chunks=words, delay=0.1))
        await leave_after(client, proxy, 3)
    elif ending == "client leaves during heartbeats":
        upstream.script("chat/completions", Delayed(30, then=Stream()))
        await leave_after(client, proxy, 1)  # the first heartbeat
    else:
        upstream.script("chat/completions", Stream(chunks=words, delay=0.2))
        reading = asyncio.create_task(read_stream(client, proxy))
        async with asyncio.timeout(5):
            while not upstream.received:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        await proxy.stop()
        assert (await reading).errors[0]["code"] == "proxy_shutdown"
    await nothing_left_open(proxy, upstream)


async def test_a_bug_in_the_stream_path_ends_the_stream_and_its_upstream_request(
    proxy_factory, upstream, client, monkeypatch, caplog
):
    proxy = await proxy_factory(FAST_STREAMS)
    send = ClientStream.sent

    def broken_after_a_few_events(self, raw, facts):
        if self.reply.deltas >= 3:
            raise RuntimeError("a bug mid-stream")
        return send(self, raw, facts)

    monkeypatch.setattr(ClientStream, "sent", broken_after_a_few_events)
    upstream.script("chat/completions", Stream(chunks=[f"w{i} " for i in range(40)], delay=0.05))
    read = await read_stream(client, proxy)
    assert read.ended_cleanly and read.errors[0]["code"] == "proxy_internal_error" and read.data[-1] == b"[DONE]"
    assert "RuntimeError: a bug mid-stream" in caplog.text
    await nothing_left_open(proxy, upstream)


async def test_a_client_that_leaves_while_uploading_a_chunked_body_leaves_nothing_bound(proxy_factory, upstream):
    """A chunked body binds its flow to the relay from its headers on, and mitmproxy connects there at once: a client
    gone before its body ended takes the binding and the relay's waiting connection with it."""
    proxy = await proxy_factory()
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        while not proxy.shared.relay.bound:
            await asyncio.sleep(0.02)
    writer.close()
    async with asyncio.timeout(5):
        while proxy.shared.relay.pending or proxy.shared.relay.bound:
            await asyncio.sleep(0.02)
    assert upstream.received == []
