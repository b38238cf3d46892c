"""Problems the chaos soak (benchmarks/soak.py) found, each reproduced alone (each was a strict xfail until fixed)."""

from __future__ import annotations

import pytest

from seaking.attempt import UpstreamRequest
from seaking.lab.fault_upstream import MessageStream, Stream
from seaking.upstream_run import UpstreamRun
from test_anthropic import STREAM_MESSAGE, read_events
from test_resume import CLAUDE, OPENAI_PREFILL, REPLY, WORDS, assert_one_ordinary_claude_reply, assert_one_ordinary_openai_reply
from test_streaming import STREAM_CHAT, read_stream


async def test_a_claude_stream_cut_after_its_message_delta_is_one_ordinary_reply(proxy_factory, upstream, client):
    """The whole text, content_block_stop and message_delta (stop_reason end_turn) came; then the body ended without
    message_stop (a connection lost in the last milliseconds). The client must not get a second content block and a
    second message_delta (docs/streaming.md: "one message_delta ... one message_stop")."""
    proxy = await proxy_factory(CLAUDE)
    upstream.script("messages", MessageStream(chunks=WORDS, no_stop=True), MessageStream(chunks=WORDS))
    read = await read_events(client, proxy, {**STREAM_MESSAGE, "max_tokens": 100})
    assert read.names.count("message_delta") == 1, read.names
    assert_one_ordinary_claude_reply(read)


async def test_a_continuation_that_breaks_inside_its_restatement_doubles_nothing(proxy_factory, upstream, client):
    """The first stream drops after 6 words; the continuation restates the last 4 ("brown fox jumps over") but drops
    after 3 of them, while the seam still holds them back; the second continuation is good. The held words are a
    start of the text the client has: they must not be sent as new text."""
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=6),
                    Stream(chunks=WORDS, restate=4, drop_after=3), Stream(chunks=WORDS))
    read = await read_stream(client, proxy, {**STREAM_CHAT, "max_tokens": 100})
    second_continuation = upstream.received[2].json()["messages"][-1]
    assert second_continuation["content"] == "".join(WORDS[:6])  # not "...jumps overbrown fox jumps"
    assert read.text == REPLY
    assert_one_ordinary_openai_reply(read)


async def test_a_run_keeps_the_targets_it_could_start_with(proxy_factory, upstream):
    """The soak's traceback (at 228 s of its 5-minute run, twice): StreamAnswer._start_continuation checked
    run.can_start(), then started run.result() in a task; in between, another stream's continuation for the same model
    was refused by the last target that had not refused it yet (remembered in snapshot.refused_prefill). result() then
    found no target, and failed with an UnboundLocalError: the client's stream ended with proxy_internal_error. Now a
    run fixes its targets when it is made, and a refusal that comes later is for the runs made after it."""
    proxy = await proxy_factory(OPENAI_PREFILL)
    snapshot = proxy.shared.snapshot
    upstream.script("chat/completions", Stream(chunks=WORDS))
    body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
    request = UpstreamRequest("POST", "/v1/chat/completions", [], body, True, model="m", first_event_timeout=2)
    refusals: set[str] = set()
    run = UpstreamRun(proxy.shared.pools, snapshot.config.retry, snapshot.failover, request,
                      refused=lambda target, model: target.base_url in refusals)
    assert run.can_start()
    refusals.update(target.base_url for target in snapshot.failover.targets)  # meanwhile, another stream's refusal
    result = await run.result()
    try:
        assert result.stream is not None and len(result.attempts) == 1
    finally:
        await result.aclose()
    too_late = UpstreamRun(proxy.shared.pools, snapshot.config.retry, snapshot.failover, request,
                           refused=lambda target, model: target.base_url in refusals)
    assert not too_late.can_start()
    with pytest.raises(RuntimeError, match="can_start"):
        await too_late.result()
