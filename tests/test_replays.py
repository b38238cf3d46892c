"""mitmweb's Replay (the replay.client command) of a client flow goes through the proxy like a live request."""

from __future__ import annotations

import asyncio

from mitmproxy import io

from conftest import chat
from seaking.lab.fault_upstream import Status
from test_streaming import STREAM_CHAT, read_stream

CLIENT_KEY = "sk-client-key-123456"  # what conftest's chat() sends
PROXY_KEY = "sk-proxy-held-key-4242"


async def replay(proxy, flow) -> None:
    """Replay `flow` as mitmweb's Replay button does, and wait until its answer is in."""
    proxy.master.commands.call("replay.client", [flow])
    async with asyncio.timeout(10):
        while flow.live or flow.response is None and flow.error is None or proxy.master.commands.call("replay.client.count"):
            await asyncio.sleep(0.02)


async def test_a_replay_is_retried_with_the_clients_key_and_noted_afresh(proxy, upstream, client):
    upstream.script("chat/completions", Status(503))
    await chat(client, proxy)
    flow = proxy.flows[-1]
    assert flow.marked == ":repeat:" and flow.comment.startswith("2 attempts: 503, 200")

    await replay(proxy, flow)
    assert flow.is_replay == "request" and flow.response.status_code == 200
    assert flow.response.headers["x-seaking-attempts"] == "1"
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {CLIENT_KEY}"
    assert flow.request.headers["authorization"] == "Bearer [redacted]"
    assert flow.marked == "" and flow.comment.startswith("1 attempt: 200 in ")  # the last run's are gone
    assert len(flow.metadata["seaking"]["attempts"]) == 1

    upstream.script("chat/completions", Status(503), Status(429))
    await replay(proxy, flow)
    assert flow.response.headers["x-seaking-attempts"] == "3"
    assert flow.marked == ":repeat:" and flow.comment.startswith("3 attempts: 503, 429, 200 in ")
    assert all(r.headers["Authorization"] == f"Bearer {CLIENT_KEY}" for r in upstream.received)
    assert len(upstream.received) == 6


async def test_a_streamed_flow_replays_through_the_relay(proxy, upstream, client):
    await read_stream(client, proxy, STREAM_CHAT)
    flow = proxy.flows[-1]
    upstream.script("chat/completions", Status(502))
    await replay(proxy, flow)
    assert flow.response.status_code == 200 and flow.response.headers["x-seaking-attempts"] == "2"
    assert flow.request.url == upstream.url + "/v1/chat/completions"
    assert flow.server_conn.address == ("127.0.0.1", upstream.port)


async def recorded_elsewhere(proxy_factory, client, tmp_path, config=None) -> list:
    """Client flows recorded by another proxy process (its Redaction, its memory), as from a recording file."""
    recording = tmp_path / "session.mitm"
    recorder = await proxy_factory(config, save_stream_file=str(recording))
    await chat(client, recorder)
    await recorder.stop()
    with recording.open("rb") as fh:
        return [f for f in io.FlowReader(fh).stream() if "attempt_of" not in f.metadata["seaking"]]


async def test_a_recorded_flow_whose_key_was_the_clients_says_how_to_replay_it(proxy_factory, upstream, client, tmp_path):
    [flow] = await recorded_elsewhere(proxy_factory, client, tmp_path)
    proxy = await proxy_factory()
    await proxy.master.load_flow(flow)
    sent_before = len(upstream.received)
    await replay(proxy, flow)
    assert len(upstream.received) == sent_before  # a placeholder key is never sent upstream
    assert flow.response.status_code == 401
    error = flow.response.json()["error"]
    assert error["code"] == "replay_key_missing" and error["type"] == "authentication_error"
    assert "target_proxy.api_key" in error["message"] and "SEAKING_API_KEY" in error["message"]
    assert "target_proxy.api_key" in flow.response.reason


async def test_a_recorded_flow_replays_with_the_proxys_own_key(proxy_factory, upstream, client, tmp_path):
    [flow] = await recorded_elsewhere(proxy_factory, client, tmp_path, {"target_proxy": {"api_key": PROXY_KEY}})
    proxy = await proxy_factory({"target_proxy": {"api_key": PROXY_KEY}, "server": {"access_key": "let-me-in-please"}})
    await proxy.master.load_flow(flow)
    upstream.script("chat/completions", Status(503))
    await replay(proxy, flow)  # no access key on the flow: a replay comes from mitmweb's user, not the network
    assert flow.response.status_code == 200 and flow.response.headers["x-seaking-attempts"] == "2"
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {PROXY_KEY}"
