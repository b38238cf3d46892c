"""Graceful shutdown: a real `mitmdump -s addon.py` subprocess is signalled mid-stream and mid-retry. Requests in
flight finish within server.shutdown_grace; what is still under way then gets a 503 or its stream an error event and a
clean end; new requests are refused; the process exits."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from types import SimpleNamespace

import pytest
import yaml

from conftest import CHAT, FAST_POLICY, call, merge
from seaking.lab.fault_upstream import Delayed, Hang, Status, Stream
from test_streaming import STREAM_CHAT, assert_ended_with_one_error, read_stream

SHUTDOWN_CODE = "proxy_shutdown"


async def start_mitmdump(mitmdump, upstream, tmp_path, **sections) -> tuple:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(merge(FAST_POLICY, sections)))
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    return proxy, SimpleNamespace(url=await proxy.start())


async def until(condition, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def exits(proxy, timeout: float = 20) -> int:
    async with asyncio.timeout(timeout):
        return await proxy.process.wait()


def port_of(url) -> int:
    return int(url.url.rsplit(":", 1)[1])


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_mid_stream_a_short_stream_finishes_and_a_long_one_ends_with_an_error_event(
    mitmdump, upstream, client, tmp_path, signum
):
    proxy, url = await start_mitmdump(mitmdump, upstream, tmp_path, server={"shutdown_grace": 1.5})
    upstream.script("chat/completions", Stream(chunks=words(100), delay=0.1), Stream(chunks=words(6), delay=0.1))
    long = asyncio.create_task(read_stream(client, url, timeout=30))
    await until(lambda: len(upstream.received) == 1)
    short = asyncio.create_task(read_stream(client, url, timeout=30))
    await until(lambda: len(upstream.received) == 2)
    await asyncio.sleep(0.2)  # both streams flow

    signalled = time.monotonic()
    proxy.process.send_signal(signum)
    await asyncio.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):  # no new connections once the shutdown began
        await asyncio.open_connection("127.0.0.1", port_of(url))

    short_read, long_read = await short, await long
    assert short_read.ended_cleanly and short_read.errors == [] and short_read.text == "".join(words(6))
    assert_ended_with_one_error(long_read, SHUTDOWN_CODE)
    assert long_read.text and long_read.text != "".join(words(100))  # it was cut: what came before is kept
    assert "shutting down" in long_read.errors[0]["message"]
    assert await exits(proxy) == 0
    assert time.monotonic() - signalled < 8  # the grace period and a little, not the stream's 10 s
    assert upstream.received[0].disconnected_at is not None  # the upstream stream was closed, not left running
    assert "request(s) in flight" in proxy.output


async def test_mid_retry_a_waiting_request_gets_a_503_and_one_that_finishes_in_time_its_answer(
    mitmdump, upstream, client, tmp_path
):
    proxy, url = await start_mitmdump(
        mitmdump, upstream, tmp_path, server={"shutdown_grace": 2}, error_handling={"max_retries": 5}
    )
    models = await call(client, "GET", url.url + "/v1/models")
    assert models.status == 200
    # The first request waits 10 s to retry (Retry-After); the second is answered 1.5 s after the signal.
    upstream.script("chat/completions", Status(503, headers={"retry-after": "10"}), Delayed(1.5))
    retrying = asyncio.create_task(call(client, "POST", url.url + "/v1/chat/completions", json=CHAT))
    await until(lambda: len(upstream.received_at("chat/completions")) == 1)
    slow = asyncio.create_task(call(client, "POST", url.url + "/v1/chat/completions", json=CHAT))
    await until(lambda: len(upstream.received_at("chat/completions")) == 2)

    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    answer = await slow
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"]
    waited = await retrying
    assert time.monotonic() - signalled >= 1.9  # it had its grace period
    assert (waited.status, waited.headers["content-type"]) == (503, "application/json")
    assert waited.error["code"] == SHUTDOWN_CODE and "2 s grace period" in waited.error["message"]
    assert await exits(proxy) == 0
    assert len(upstream.received_at("chat/completions")) == 2  # the retry never went out
    assert (tmp_path / "cache" / "seaking-proxy" / "models.json").exists()  # the models cache is on disk


async def test_a_stream_kept_alive_with_heartbeats_ends_with_the_error_event(mitmdump, upstream, client, tmp_path):
    proxy, url = await start_mitmdump(
        mitmdump, upstream, tmp_path, server={"shutdown_grace": 0.5}, streaming={"heartbeat_interval": 0.2}
    )
    upstream.always("chat/completions", Hang())
    reading = asyncio.create_task(read_stream(client, url, timeout=30))
    await asyncio.sleep(0.8)  # committed: 200 and heartbeats
    proxy.process.send_signal(signal.SIGINT)
    read = await reading
    assert read.heartbeats >= 2
    assert_ended_with_one_error(read, SHUTDOWN_CODE)
    assert await exits(proxy) == 0


async def test_a_stream_not_yet_answered_when_the_grace_ends_gets_the_503(mitmdump, upstream, client, tmp_path):
    """Before its first heartbeat nothing is committed: the client gets the 503, as a request that is not a stream."""
    proxy, url = await start_mitmdump(
        mitmdump, upstream, tmp_path, server={"shutdown_grace": 0.3}, streaming={"heartbeat_interval": 30}
    )
    upstream.always("chat/completions", Hang())
    answer = asyncio.create_task(call(client, "POST", url.url + "/v1/chat/completions", json=STREAM_CHAT))
    await until(lambda: len(upstream.received) == 1)
    proxy.process.send_signal(signal.SIGINT)
    answer = await answer
    assert (answer.status, answer.headers["content-type"], answer.error["code"]) == (503, "application/json", SHUTDOWN_CODE)
    assert await exits(proxy) == 0


async def test_a_continuation_still_coming_when_the_grace_ends_ends_the_stream_with_one_error_event(
    mitmdump, upstream, client, tmp_path
):
    proxy, url = await start_mitmdump(
        mitmdump, upstream, tmp_path, server={"shutdown_grace": 0.5},
        target_proxy={"prefill": "assistant", "timeout": 30}, streaming={"heartbeat_interval": 0.2},
    )
    upstream.script("chat/completions", Stream(chunks=words(20), drop_after=5), Delayed(30, then=Stream(chunks=words(20))))
    reading = asyncio.create_task(read_stream(client, url, timeout=30))
    await until(lambda: len(upstream.received) == 2)  # the continuation was asked for
    proxy.process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    read = await reading
    assert time.monotonic() - signalled < 5  # at the end of the grace, not when the continuation would have come
    assert read.text == "".join(words(20)[:5])
    assert_ended_with_one_error(read, "stream_interrupted")  # what the client has is what broke off
    assert await exits(proxy) == 0


async def test_a_new_request_on_an_open_connection_is_refused_during_the_grace_period(mitmdump, upstream, client, tmp_path):
    proxy, url = await start_mitmdump(mitmdump, upstream, tmp_path, server={"shutdown_grace": 3})
    upstream.script("chat/completions", Stream(chunks=words(20), delay=0.1))
    streaming = asyncio.create_task(read_stream(client, url, timeout=30))
    await until(lambda: len(upstream.received) == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(request)
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in first.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)

    proxy.process.send_signal(signal.SIGINT)
    await asyncio.sleep(0.3)
    writer.write(request)  # the same keep-alive connection, after the signal
    async with asyncio.timeout(10):
        refused = await reader.read()  # to the end: the proxy closes the connection after its answer
    writer.close()
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert b"connection: close" in refused.lower() and b'"code": "proxy_shutdown"' in refused
    assert len(upstream.received_at("models")) == 1  # the refused request went nowhere

    read = await streaming  # the stream in flight finished in its grace period
    assert read.ended_cleanly and read.errors == [] and read.text == "".join(words(20))
    assert await exits(proxy) == 0


async def test_a_second_signal_ends_the_wait(mitmdump, upstream, client, tmp_path):
    proxy, url = await start_mitmdump(mitmdump, upstream, tmp_path, server={"shutdown_grace": 60})
    upstream.always("chat/completions", Stream(chunks=words(300), delay=0.1))
    reading = asyncio.create_task(read_stream(client, url, body=STREAM_CHAT, timeout=30))
    await until(lambda: len(upstream.received) == 1)
    await asyncio.sleep(0.3)
    proxy.process.send_signal(signal.SIGINT)
    await asyncio.sleep(1)
    signalled_again = time.monotonic()
    proxy.process.send_signal(signal.SIGINT)
    read = await reading
    assert_ended_with_one_error(read, SHUTDOWN_CODE)
    assert await exits(proxy) == 0
    assert time.monotonic() - signalled_again < 5  # not the 60 s grace period
    assert "not waiting any longer" in proxy.output


async def test_with_nothing_in_flight_it_exits_at_once(mitmdump, upstream, client, tmp_path):
    proxy, url = await start_mitmdump(mitmdump, upstream, tmp_path, server={"shutdown_grace": 60})
    assert (await call(client, "POST", url.url + "/v1/chat/completions", json=CHAT)).status == 200
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    assert await exits(proxy) == 0
    assert time.monotonic() - signalled < 5


async def test_idle_keep_alive_connections_are_closed_and_the_exit_prints_no_traceback(mitmdump, upstream, tmp_path):
    """Left open, an idle keep-alive connection's task is cancelled by asyncio.run() after mitmproxy returns, and on
    CPython 3.11.7 and 3.12.1 asyncio then prints a CancelledError traceback through mitmproxy's handle_stream (see
    GracefulShutdown._close_client_connections); other Pythons print none either way, but the proxy closes them."""
    proxy, url = await start_mitmdump(mitmdump, upstream, tmp_path)
    stream = json.dumps({**CHAT, "stream": True}).encode()
    requests = [  # one connection idle after a plain answer, one after a stream (mitmproxy held one to the relay)
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(stream)}\r\n\r\n".encode()
        + stream,
    ]
    idle = []
    for request in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        writer.write(request)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
            if length := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
                await reader.readexactly(int(length.group(1)))
            else:  # chunked: to its last chunk
                await reader.readuntil(b"\r\n0\r\n\r\n")
        idle.append((reader, writer))
    await asyncio.sleep(0.2)  # both answers are over; the connections stay open

    proxy.process.send_signal(signal.SIGINT)
    assert await exits(proxy) == 0
    await proxy.stop()  # the rest of its output
    for reader, writer in idle:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the proxy
        writer.close()
    assert "Traceback" not in proxy.output and "CancelledError" not in proxy.output, proxy.output
    assert proxy.output.count("client disconnect") == 2


async def test_in_process_a_waiting_models_request_gets_the_503_and_no_addon_fails(proxy_factory, upstream, client, caplog):
    """The same drain when mitmproxy runs in this process (master.shutdown(), as mitmweb's and the console's quit do)."""
    proxy = await proxy_factory({"server": {"shutdown_grace": 0.3}})
    upstream.always("models", Hang())
    waiting = asyncio.create_task(call(client, "GET", proxy.url + "/v1/models"))
    await until(lambda: len(upstream.received) == 1)
    proxy.master.shutdown()
    answer = await waiting
    assert (answer.status, answer.error["code"]) == (503, SHUTDOWN_CODE)
    async with asyncio.timeout(10):
        await proxy.task
    assert proxy.flows[-1].metadata["seaking"]["ended_early"] == SHUTDOWN_CODE
    assert "Addon error" not in caplog.text
