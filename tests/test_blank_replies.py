"""Blank replies are failed attempts: a completion or a stream that ends normally with no content at all — no text, no
tool call, no refusal — is retried like a 503, and when every attempt was blank the client hears so clearly."""

from __future__ import annotations

import pytest

from conftest import CHAT, chat
from seaking.lab.fault_upstream import REPLY_TEXT, Blank, Delayed, Stream
from test_anthropic import MESSAGE, STREAM_MESSAGE, messages, read_events
from test_streaming import STREAM_CHAT, read_stream


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_blank_openai_reply_is_retried_and_the_good_one_arrives(proxy, upstream, client, stream):
    upstream.script("chat/completions", Blank())
    if stream:
        read = await read_stream(client, proxy)
        assert (read.text, read.errors, read.data[-1]) == (REPLY_TEXT, [], b"[DONE]")
        assert read.data[0].find(b'"role"') >= 0  # the good stream's own preamble: nothing of the blank one reached us
    else:
        answer = await chat(client, proxy)
        assert answer.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    assert len(upstream.received) == 2
    [first, _] = proxy.flows[-1].metadata["seaking"]["attempts"]
    assert (first["verdict"], first["failure"], first["detail"]) == ("retry", "empty", "upstream answered with an empty reply")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_blank_claude_reply_is_retried_and_the_good_one_arrives(proxy, upstream, client, stream):
    upstream.script("messages", Blank())
    if stream:
        read = await read_events(client, proxy)
        assert read.text == REPLY_TEXT and read.errors == [] and read.names.count("message_start") == 1
    else:
        answer = await messages(client, proxy, MESSAGE)
        assert answer.json()["content"][0]["text"] == REPLY_TEXT
    assert len(upstream.received) == 2


async def test_blank_every_time_is_a_clear_error_not_a_blank_message(proxy, upstream, client):
    upstream.always("chat/completions", Blank())
    answer = await chat(client, proxy)
    assert answer.status == 502 and answer.error["code"] == "upstream_empty_reply"
    assert "upstream answered with an empty reply 4 times" in answer.error["message"].lower()
    assert answer.headers["x-should-retry"] == "false"
    read = await read_stream(client, proxy)  # nothing was sent before: the same error, whole
    assert read.status == 502 and read.errors == [] and b"upstream_empty_reply" in read.body


async def test_blank_every_time_behind_heartbeats_is_one_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}})
    upstream.always("messages", Delayed(0.1, then=Blank()))
    read = await read_events(client, proxy)
    assert read.status == 200 and read.heartbeats >= 1
    [error] = read.errors
    assert error["code"] == "upstream_empty_reply" and "empty reply 4 times" in error["message"]


async def test_retry_empty_off_passes_a_blank_reply_on(proxy_factory, upstream, client):
    proxy = await proxy_factory({"error_handling": {"retry_empty": False}})
    upstream.script("chat/completions", Blank(), Blank())
    assert (await chat(client, proxy)).json()["choices"][0]["message"]["content"] == ""
    read = await read_stream(client, proxy)
    assert read.text == "" and read.errors == [] and read.data[-1] == b"[DONE]"
    assert len(upstream.received) == 2


@pytest.mark.parametrize(
    "reply",
    [
        Stream(chunks=['{"city": ', '"Paris"}'], tool_call=True),  # a tool call, no text: not blank
        Stream(chunks=[" "]),  # whitespace is text
    ],
    ids=["tool call", "whitespace"],
)
async def test_what_is_not_blank(proxy, upstream, client, reply):
    upstream.script("chat/completions", reply)
    read = await read_stream(client, proxy)
    assert read.errors == [] and len(upstream.received) == 1


async def test_the_role_preamble_is_not_content(proxy, upstream, client):
    """A stream that says only {"role": "assistant", "content": ""} and then fails can still be retried."""
    upstream.script("chat/completions", Stream(chunks=[""], drop_after=1), Stream(chunks=["a", "b"]))
    read = await read_stream(client, proxy, {**STREAM_CHAT})
    assert read.text == "ab" and read.errors == [] and len(upstream.received) == 2
