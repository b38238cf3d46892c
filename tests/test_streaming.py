"""Streaming ("stream": true) through real mitmproxy: live chunks, retries before the first byte, heartbeats, and
every broken stream ended cleanly. The client side is read with timestamps."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import CHAT, call
import seaking.relay as relay_module
from seaking.streaming import UpstreamStream
from seaking.lab.fault_upstream import REPLY_TEXT, Delayed, Hang, Reset, Status, Stream
from seaking.lab.harness import listeners

STREAM_CHAT = {**CHAT, "stream": True}
ERROR_TYPES_SHOWN_BY_SILLYTAVERN = {"message", "type", "code"}


@dataclass
class StreamRead:
    status: int
    headers: dict
    lines: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds since the request, line)
    ended_cleanly: bool = False
    body: bytes = b""

    @property
    def data(self) -> list[bytes]:
        return [line[6:].strip() for _, line in self.lines if line.startswith(b"data: ")]

    @property
    def events(self) -> list[dict]:
        return [json.loads(d) for d in self.data if d != b"[DONE]"]

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if "error" in e]

    @property
    def text(self) -> str:
        return "".join(e["choices"][0]["delta"].get("content", "") for e in self.events if e.get("choices"))

    @property
    def heartbeats(self) -> int:
        return sum(1 for _, line in self.lines if line.startswith(b": keep-alive"))

    def data_times(self) -> list[float]:
        return [t for t, line in self.lines if line.startswith(b"data: ")]


async def read_stream(client, proxy, body=None, path="/v1/chat/completions", timeout=20) -> StreamRead:
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        headers = {"Authorization": "Bearer sk-client-key-123456"}
        async with client.post(proxy.url + path, json=body or STREAM_CHAT, headers=headers) as response:
            read = StreamRead(response.status, dict(response.headers))
            try:
                async for line in response.content:
                    read.body += line
                    if line.strip():
                        read.lines.append((time.monotonic() - started, line.rstrip(b"\r\n")))
                read.ended_cleanly = True
            except aiohttp.ClientPayloadError:
                read.ended_cleanly = False
    return read


def assert_ended_with_one_error(read: StreamRead, code: str) -> None:
    assert read.status == 200
    assert read.ended_cleanly
    assert len(read.errors) == 1
    assert set(read.errors[0]) >= ERROR_TYPES_SHOWN_BY_SILLYTAVERN
    assert read.errors[0]["code"] == code
    assert read.data[-1] == b"[DONE]"
    assert read.data[-2].startswith(b'{"error"')  # the error event is the last before [DONE]


# --- 1. chunks reach the client as the upstream sends them -------------------------------------------------------


@pytest.mark.slow
async def test_chunks_arrive_live_with_the_upstream_timing(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=[f"w{i} " for i in range(8)], delay=0.15))
    read = await read_stream(client, proxy)
    assert read.status == 200 and read.ended_cleanly
    assert read.text == "".join(f"w{i} " for i in range(8))
    times = read.data_times()
    gaps = [b - a for a, b in zip(times, times[1:8])]
    # Buffered delivery would bunch the chunks together; live delivery keeps the upstream's 0.15 s spacing.
    assert all(gap > 0.08 for gap in gaps), gaps
    assert times[7] - times[0] > 0.9
    assert read.data[-1] == b"[DONE]"
    assert read.errors == []


async def test_the_upstream_bytes_pass_unchanged(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["ünï", "cödé"]))
    read = await read_stream(client, proxy)
    assert read.text == "ünïcödé"
    assert read.headers["Content-Type"] == "text/event-stream"
    assert read.headers["Cache-Control"] == "no-cache"


# --- 2. failures before any byte are retried -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [Status(503), Status(429, headers={"Retry-After": "0"}), Reset(), Stream(error_first="overloaded"),
     Stream(chunks=[], finish_reason=None, no_done=True)],
    ids=["503", "429", "reset", "error-as-first-event", "empty-stream"],
)
async def test_failures_before_the_first_byte_are_retried_and_the_retry_streams_live(proxy, upstream, client, fault):
    upstream.script("chat/completions", fault, fault, Stream(chunks=["a", "b", "c", "d"], delay=0.1))
    read = await read_stream(client, proxy)
    assert read.status == 200 and read.ended_cleanly
    assert read.text == "abcd"
    assert read.errors == []
    assert len(upstream.received) == 3
    times = read.data_times()
    assert times[3] - times[0] > 0.2  # still chunk by chunk


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        (Stream(stall_after=0), "no first event from upstream within 0.3 s"),
        (Stream(drop_after=0), "upstream broke off the stream before its first event"),
    ],
    ids=["silent", "broke off"],
)
async def test_no_first_event_within_first_event_timeout_is_retried(proxy_factory, upstream, client, fault, detail):
    proxy = await proxy_factory({"streaming": {"first_event_timeout": 0.3}, "error_handling": {"hedge_on_timeout": False}})
    upstream.script("chat/completions", fault)
    read = await read_stream(client, proxy)
    assert read.text == REPLY_TEXT
    assert len(upstream.received) == 2
    assert upstream.received[0].disconnected_at is not None  # the silent attempt was closed, not left open
    assert proxy.flows[-1].metadata["seaking"]["attempts"][0]["detail"] == detail


async def test_a_non_streaming_answer_to_a_stream_request_passes_as_received(proxy, upstream, client):
    upstream.script("chat/completions", Status(200, body={"choices": [{"message": {"content": "whole"}}]}))
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"] == "whole"


# --- 3. fail-fast before any byte ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 403])
async def test_fail_fast_before_any_byte_is_a_json_error(proxy, upstream, client, code):
    upstream.script("chat/completions", Status(code, body={"error": {"message": "no such key"}}))
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        assert response.status == code
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["message"] == "no such key"
    assert len(upstream.received) == 1


async def test_giving_up_before_any_byte_is_a_json_error(proxy, upstream, client):
    upstream.always("chat/completions", Status(502))
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        assert response.status == 502
        assert (await response.json())["error"]["attempts"] == 4


# --- 4. heartbeats -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_slow_upstream_gets_heartbeats_then_the_stream(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.2}})
    upstream.script("chat/completions", Delayed(1.0, then=Stream(chunks=["x", "y"], delay=0.1)))
    read = await read_stream(client, proxy)
    assert read.status == 200 and read.ended_cleanly
    assert read.headers["Content-Type"].startswith("text/event-stream")
    assert read.heartbeats >= 3
    first_heartbeat = next(t for t, line in read.lines if line.startswith(b":"))
    assert first_heartbeat < read.data_times()[0] - 0.5  # the client heard from us long before the data
    assert read.text == "xy" and read.errors == [] and read.data[-1] == b"[DONE]"


@pytest.mark.slow
async def test_heartbeats_cover_retries_and_their_back_off(proxy_factory, upstream, client):
    proxy = await proxy_factory(
        {"streaming": {"heartbeat_interval": 0.2}, "error_handling": {"base_delay": 0.4, "max_delay": 0.4}}
    )
    upstream.script("chat/completions", Status(503, headers={"Retry-After": "0.5"}), Status(503, headers={"Retry-After": "0.5"}))
    read = await read_stream(client, proxy)
    assert read.heartbeats >= 3
    assert read.text == REPLY_TEXT
    assert len(upstream.received) == 3


async def test_a_final_failure_after_heartbeats_is_an_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}, "error_handling": {"base_delay": 0.15, "max_delay": 0.15}})
    upstream.always("chat/completions", Delayed(0.05, then=Status(503)))
    read = await read_stream(client, proxy)
    assert read.heartbeats >= 1
    assert_ended_with_one_error(read, "upstream_http_503")
    assert "4 attempts" in read.errors[0]["message"]


async def test_a_fail_fast_after_heartbeats_is_an_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}})
    upstream.script("chat/completions", Delayed(0.4, then=Status(401, body={"error": {"message": "bad key"}})))
    read = await read_stream(client, proxy)
    assert_ended_with_one_error(read, "upstream_http_401")
    assert "bad key" in read.errors[0]["message"]


async def test_a_non_streaming_answer_after_heartbeats_is_streamed(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}})
    whole = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "all at once"}, "finish_reason": "stop"}]}
    upstream.script("chat/completions", Delayed(0.4, then=Status(200, body=whole)))
    read = await read_stream(client, proxy)
    assert read.text == "all at once" and read.errors == [] and read.data[-1] == b"[DONE]"


@pytest.mark.slow
async def test_the_deadline_ends_a_heartbeat_stream_with_an_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory(
        {"streaming": {"heartbeat_interval": 0.1}, "target_proxy": {"timeout": 0.3}, "error_handling": {"deadline": 0.8, "max_retries": 20}}
    )
    upstream.always("chat/completions", Hang())
    read = await read_stream(client, proxy)
    assert_ended_with_one_error(read, "upstream_timeout")
    assert "deadline" in read.errors[0]["message"]


# --- 5. every broken stream ends cleanly ---------------------------------------------------------------------------------


async def test_a_mid_stream_drop_ends_with_one_error_event(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["a", "b", "c", "d"], drop_after=2))
    read = await read_stream(client, proxy)
    assert read.text == "ab"
    assert_ended_with_one_error(read, "stream_interrupted")
    assert len(upstream.received) == 1  # bytes were sent: no retry, which would repeat them


async def test_a_silence_longer_than_idle_timeout_ends_with_one_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"idle_timeout": 0.4}})
    upstream.script("chat/completions", Stream(chunks=["a", "b", "c"], stall_after=1))
    read = await read_stream(client, proxy)
    assert read.text == "a"
    assert_ended_with_one_error(read, "stream_idle_timeout")
    await asyncio.sleep(0.2)
    assert upstream.received[0].disconnected_at is not None  # the stalled upstream was let go


async def test_streams_ended_by_idle_timeout_or_a_drop_are_freed_at_once(proxy_factory, upstream, client):
    # Attempt flows are off: mitmproxy's own type check of a new Request or Response makes a cycle that holds its
    # caller's frames (and so an attempt's stream) until the cyclic GC runs.
    proxy = await proxy_factory({"streaming": {"idle_timeout": 0.2, "resume": False}}, seaking_attempt_flows=False)
    upstream.always("chat/completions", Stream(chunks=["a", "b", "c"], stall_after=1))

    def kept() -> list[UpstreamStream]:
        return [o for o in gc.get_objects() if isinstance(o, UpstreamStream)]

    # Kept for good: aiohttp ends a read pending on a closed response with one shared exception instance, whose
    # traceback grew by the frames of every reader it was raised into (one stream after another: each of them).
    for _ in range(3):
        assert_ended_with_one_error(await read_stream(client, proxy), "stream_idle_timeout")
    await asyncio.sleep(0.1)
    gc.collect()
    assert kept() == []
    # Kept until the cyclic GC runs: the reader keeps its error, whose traceback keeps the frame that reads it.
    upstream.script("chat/completions", Stream(chunks=["a", "b", "c"], drop_after=1))
    gc.disable()
    try:
        assert_ended_with_one_error(await read_stream(client, proxy), "stream_interrupted")
        assert_ended_with_one_error(await read_stream(client, proxy), "stream_idle_timeout")
        await asyncio.sleep(0.1)
        assert kept() == []
    finally:
        gc.enable()


async def test_an_end_without_done_or_finish_reason_ends_with_one_error_event(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["a", "b"], no_done=True, finish_reason=None))
    read = await read_stream(client, proxy)
    assert read.text == "ab"
    assert_ended_with_one_error(read, "stream_incomplete")


async def test_a_finish_reason_without_done_gets_done_appended(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["a", "b"], no_done=True))
    read = await read_stream(client, proxy)
    assert read.text == "ab" and read.errors == []
    assert read.data[-1] == b"[DONE]"
    assert read.data.count(b"[DONE]") == 1


async def test_an_upstream_error_event_mid_stream_is_not_doubled(proxy, upstream, client):
    class ErrorMidStream(Stream):
        async def __call__(self, request, received):
            from aiohttp import web

            from seaking.lab.fault_upstream import chunk, sse

            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(sse(chunk("partial", "m", 0)))
            await response.write(sse({"error": {"message": "provider crashed", "type": "server_error"}}))
            await response.write_eof()
            return response

    upstream.script("chat/completions", ErrorMidStream())
    read = await read_stream(client, proxy)
    assert read.status == 200 and read.ended_cleanly
    assert [e["message"] for e in read.errors] == ["provider crashed"], read.lines
    assert read.data[-1] == b"[DONE]"


async def test_the_error_event_starts_on_its_own_line_after_a_partial_event(proxy, upstream, client):
    class DropMidLine(Stream):
        async def __call__(self, request, received):
            from aiohttp import web

            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"delta": {"content": "ok"}}]}\n\ndata: {"choi')
            request.transport.close()
            raise asyncio.CancelledError

    upstream.script("chat/completions", DropMidLine())
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        body = await response.read()
    events = [block for block in body.split(b"\n\n") if block]
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b'data: {"error"')


# --- 6. a client that leaves ---------------------------------------------------------------------------------------------


async def test_a_client_that_leaves_cancels_the_upstream_at_once(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=[str(i) for i in range(100)], delay=0.5))
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        await response.content.readline()
        left = time.monotonic()
        response.close()
    for _ in range(100):
        if upstream.received[0].disconnected_at is not None:
            break
        await asyncio.sleep(0.02)
    assert upstream.received[0].disconnected_at is not None
    assert upstream.received[0].disconnected_at - left < 0.45  # before the upstream's next chunk


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_abandoned_streams_leak_nothing(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}})
    upstream.always("chat/completions", Stream(chunks=[str(i) for i in range(50)], delay=0.2))
    upstream.script("chat/completions", Stream())
    await read_stream(client, proxy)  # warm up pools, the relay, mitmproxy's first-use state
    gc.collect()
    fds_before, tasks_before = open_fds(), len(asyncio.all_tasks())

    async def abandon(after_lines: int, delayed: bool) -> None:
        async with aiohttp.ClientSession() as own:  # its own connection, closed as a leaving browser would
            if delayed:
                upstream.script("chat/completions", Delayed(0.3, then=Stream(delay=0.2)))
            async with own.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
                for _ in range(after_lines):
                    await response.content.readline()

    await asyncio.gather(*(abandon(i % 3, delayed=i % 4 == 0) for i in range(40)))
    for _ in range(100):  # the proxy notices disconnects asynchronously
        await asyncio.sleep(0.05)
        if all(r.disconnected_at or r is upstream.received[0] for r in upstream.received[1:]) and proxy.shared.relay.pending == 0:
            break
    gc.collect()
    assert proxy.shared.relay.pending == 0
    assert proxy.shared.relay.bound == 0
    assert [r for r in upstream.received[1:] if r.disconnected_at is None] == []
    assert len(asyncio.all_tasks()) <= tasks_before + 2
    assert open_fds() <= fds_before + 4


# --- 7. mitmweb --------------------------------------------------------------------------------------------------------


async def test_a_streamed_flow_shows_its_true_upstream_history_and_body(proxy_factory, upstream, client):
    proxy = await proxy_factory(store_streamed_bodies=True)
    upstream.script("chat/completions", Status(503), Stream(chunks=["a", "b"]))
    read = await read_stream(client, proxy)
    flow = proxy.flows[-1]
    assert flow.request.url == upstream.url + "/v1/chat/completions"
    assert flow.request.headers["authorization"] == "Bearer [redacted]"
    assert json.loads(flow.request.content)["stream"] is True  # the relay got none of it; the flow shows it all
    assert flow.request.headers["content-length"] == str(len(flow.request.raw_content))
    assert flow.marked == ":repeat:" and flow.comment.startswith("2 attempts: 503, 200 in ")
    assert flow.response.content == read.body


async def test_a_streamed_flow_keeps_what_its_client_was_sent_its_error_event_too(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["a", "b", "c"], drop_after=2))
    read = await read_stream(client, proxy)
    assert read.errors and proxy.flows[-1].response.content == read.body


async def test_a_long_stream_keeps_its_start_and_its_end(proxy, upstream, client, monkeypatch):
    monkeypatch.setattr(relay_module, "CLIENT_COPY_BYTES", 1000)
    upstream.script("chat/completions", Stream(chunks=[f"w{i} " for i in range(100)], drop_after=90))
    read = await read_stream(client, proxy)
    kept = proxy.flows[-1].response.content
    left_out = len(read.body) - 1000
    assert kept == read.body[:500] + f": ... {left_out} bytes not kept by seaking-proxy ...\n\n".encode() + read.body[-500:]
    assert b"stream_interrupted" in kept


async def test_plain_mitmdump_keeps_no_streamed_body(proxy_factory, upstream, client):
    proxy = await proxy_factory(flow_list=False)  # no flow list, no recording: nobody would see it
    await read_stream(client, proxy)
    assert not proxy.flows[-1].response.content


async def test_a_broken_stream_says_so_in_the_flow_comment(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=["a", "bb", "c"], delay=0.1, drop_after=2))
    await read_stream(client, proxy)
    flow = proxy.flows[-1]
    assert flow.response.status_code == 200
    comment = re.fullmatch(r"1 attempt: 200, stream broke after 3 chars in (\S+) s \(stream_interrupted\)", flow.comment)
    assert comment and float(comment[1]) >= 0.1  # the whole time, not the time to the first event
    assert flow.marked == ":x:"


# --- concurrency ---------------------------------------------------------------------------------------------------------


async def test_many_parallel_streams_with_drops_all_end(proxy, upstream, client):
    words = [f"t{i} " for i in range(6)]
    faults = [Stream(chunks=words, delay=0.05, drop_after=3) if i % 3 == 0 else Stream(chunks=words, delay=0.05) for i in range(60)]
    upstream.script("chat/completions", *faults)
    reads = await asyncio.gather(*(read_stream(client, proxy, timeout=30) for _ in range(60)))
    complete = [r for r in reads if not r.errors]
    broken = [r for r in reads if r.errors]
    for r in reads:
        assert (r.status, r.ended_cleanly, r.data[-1:]) == (200, True, [b"[DONE]"]), r.lines
    assert len(broken) == 20 and all(r.errors[0]["code"] == "stream_interrupted" for r in broken)
    assert [r.text for r in complete] == ["".join(words)] * 40
    assert [r.text for r in broken] == ["".join(words[:3])] * 20


@pytest.mark.slow
async def test_a_burst_of_a_thousand_streams_is_relayed_without_a_closed_connection(mitmdump, tmp_path):
    """Each stream opens its own connection to the relay at once: a short listen backlog there closed some of them
    under a burst, and their clients got mitmproxy's HTML 502 "server closed connection" (in about one run of three
    with aiohttp's default backlog). The upstream runs as a process of its own, so that the first events, and so the
    relay connections, come as one burst."""
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_upstream", "--chunks", "20", "--chunk-delay", "0.05",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=Path(__file__).parent.parent,
    )
    try:
        async with asyncio.timeout(20):
            [port] = listeners((await upstream.stdout.readline()).decode()).values()
        upstream_url = f"http://127.0.0.1:{port}"
        config = tmp_path / "config.yaml"
        config.write_text("health_check: {interval: 0}\n")
        url = await mitmdump("--mode", f"reverse:{upstream_url}", "--set", f"seaking_config={config}").start()
        timeout = aiohttp.ClientTimeout(total=120)
        clients = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout) for _ in range(1000)]
        try:
            # Connected first, as SillyTavern users are: then the requests, and so the relay connections, come at once.
            await asyncio.gather(*(call(c, "POST", url + "/v1/chat/completions", json=CHAT) for c in clients))
            reads = await asyncio.gather(*(read_stream(c, Url(url), timeout=120) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    finally:
        upstream.kill()
        await upstream.wait()
    assert [(r.status, r.body[:300]) for r in reads if r.status != 200][:3] == []
    assert all(r.ended_cleanly and r.data[-1:] == [b"[DONE]"] for r in reads)


@dataclass
class Url:
    url: str



async def test_a_last_event_ended_by_cr_cr_at_the_end_of_the_body_is_whole(proxy, upstream, client):
    """CR CR is a blank line too: the [DONE] it ends is the stream's end, though no LF can follow at the end of the
    body. The client gets the stream as sent, with nothing added (no second [DONE], no error event)."""
    first = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\r\r'
    rest = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\r\rdata: [DONE]\r\r'

    async def cr_cr_at_the_end(request, received):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(0.05)  # the rest in a read of its own
        await response.write(rest)
        await response.write_eof()
        return response

    upstream.script("chat/completions", cr_cr_at_the_end)
    async with client.post(proxy.url + "/v1/chat/completions", json=STREAM_CHAT) as response:
        assert await response.read() == first + rest
    assert len(upstream.received) == 1 and proxy.flows[-1].metadata["seaking"].get("stream_error") is None
