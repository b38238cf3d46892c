"""Streams that heal: a reply that breaks off after content reached the client is continued from where it broke, and
the client gets one whole, ordinary reply. The fault upstream continues a reply it is given the start of (a trailing
assistant message), so what these tests read is a real continuation request's real answer."""

from __future__ import annotations

import json

import pytest

from seaking.lab.fault_upstream import Hang, MessageStream, PrefillRefused, Status, Stream, split_words
from seaking.dialects import ANTHROPIC, OPENAI
from seaking.resume import Continuation, Prefill, why_not_continued
from seaking.splice import Seam, splicer_for
from seaking.sse import parse_event
from seaking.streaming import Reply, read
from test_anthropic import STREAM_MESSAGE, read_events
from test_metrics import scrape
from test_properties_stream import client_after, openai_chunk, written
from test_reload import until
from test_streaming import STREAM_CHAT, read_stream

REPLY = "The quick brown fox jumps over the lazy dog and runs far away into the woods"
WORDS = split_words(REPLY)
OPENAI_PREFILL = {"target_proxy": {"prefill": "assistant"}, "streaming": {"idle_timeout": 0.4}}
CLAUDE = {"streaming": {"idle_timeout": 0.4}}  # prefill: auto is assistant for the Messages API


def continuation_of(received) -> dict:
    """The trailing assistant message a continuation request carries."""
    last = received.json()["messages"][-1]
    assert last["role"] == "assistant"
    return last


def assert_one_ordinary_openai_reply(read) -> None:
    assert read.status == 200 and read.ended_cleanly and read.errors == []
    assert read.text == REPLY
    chunks = [e for e in read.events if e.get("choices") is not None]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1  # the first stream's, throughout
    assert sum(1 for c in chunks for choice in c["choices"] if choice.get("finish_reason")) == 1
    assert sum(1 for c in chunks if "role" in c["choices"][0].get("delta", {})) <= 1  # one preamble at most
    assert read.data.count(b"[DONE]") == 1 and read.data[-1] == b"[DONE]"


def assert_one_ordinary_claude_reply(read) -> None:
    assert read.status == 200 and read.ended_cleanly and read.errors == []
    assert read.text == REPLY
    assert read.names.count("message_start") == 1 and read.names.count("message_stop") == 1
    assert read.names[-1] == "message_stop"
    assert {d["index"] for n, d in read.events if n.startswith("content_block")} == {0}


# --- the whole reply after a break --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [{"drop_after": 4}, {"stall_after": 4}, {"no_done": True, "finish_reason": None}],
                         ids=["drop", "stall", "early end"])
async def test_an_openai_stream_that_breaks_is_continued_into_one_whole_reply(proxy_factory, upstream, client, fault):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS if "drop_after" in fault or "stall_after" in fault else WORDS[:4], **fault),
                    Stream(chunks=WORDS))
    read = await read_stream(client, proxy, {**STREAM_CHAT, "max_tokens": 100})
    assert_one_ordinary_openai_reply(read)
    first, continuation = upstream.received
    assert continuation_of(continuation) == {"role": "assistant", "content": "".join(WORDS[:4])}
    assert continuation.json()["messages"][:-1] == first.json()["messages"]  # the client's request otherwise unchanged
    assert continuation.json()["max_tokens"] == 100 - 4  # lowered by the content events already streamed


async def test_two_drops_are_two_continuations(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Stream(chunks=WORDS, drop_after=2),
                    Stream(chunks=WORDS))
    read = await read_stream(client, proxy)
    assert_one_ordinary_openai_reply(read)
    assert continuation_of(upstream.received[2])["content"] == "".join(WORDS[:5])
    flow = proxy.flows[-1]
    assert flow.marked == ":repeat:"
    assert flow.comment.startswith("3 attempts: 200, continuation 200, continuation 200 → resumed after a drop at 15 chars; "
                                   "resumed after a drop at 25 chars in ")


async def test_continuations_stop_at_resume_attempts(proxy_factory, upstream, client):
    proxy = await proxy_factory({**OPENAI_PREFILL, "streaming": {"resume_attempts": 1}})
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Stream(chunks=WORDS, drop_after=2))
    read = await read_stream(client, proxy)
    assert read.text == "".join(WORDS[:5]) and [e["code"] for e in read.errors] == ["stream_interrupted"]
    assert read.data[-1] == b"[DONE]" and len(upstream.received) == 2


async def test_a_claude_stream_that_breaks_is_continued_into_one_whole_reply(proxy_factory, upstream, client):
    proxy = await proxy_factory(CLAUDE)
    upstream.script("messages", MessageStream(chunks=WORDS, drop_after=5), MessageStream(chunks=WORDS))
    read = await read_events(client, proxy, {**STREAM_MESSAGE, "max_tokens": 100})
    assert_one_ordinary_claude_reply(read)
    [usage] = [d["usage"] for n, d in read.events if n == "message_delta"]
    assert usage["output_tokens"] == 5 + (len(WORDS) - 5)  # both parts
    assert upstream.received[1].json()["max_tokens"] == 95


async def test_claudes_prefill_is_trimmed_and_its_whitespace_not_sent_twice(proxy_factory, upstream, client):
    words = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "fox."]
    proxy = await proxy_factory(CLAUDE)
    upstream.script("messages", MessageStream(chunks=words, drop_after=2), MessageStream(chunks=words))
    read = await read_events(client, proxy)
    assert read.text == "".join(words)
    assert continuation_of(upstream.received[1])["content"] == "Once upon"  # Anthropic refuses trailing whitespace


async def test_the_clients_own_prefill_is_extended_not_doubled(proxy_factory, upstream, client):
    """SillyTavern's Claude presets end the request with an assistant prefill: the continuation extends it."""
    proxy = await proxy_factory(CLAUDE)
    body = {**STREAM_MESSAGE, "messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Sure!"}]}
    upstream.script("messages", MessageStream(chunks=WORDS, drop_after=3), MessageStream(chunks=WORDS))
    read = await read_events(client, proxy, body)
    assert read.text == REPLY
    messages = upstream.received[1].json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["content"] == "Sure!" + "".join(WORDS[:3])


async def test_a_restated_seam_is_not_doubled(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=6), Stream(chunks=WORDS, restate=4))
    read = await read_stream(client, proxy)
    assert read.text == REPLY  # "brown fox jumps over" came twice from the upstream, once to the client


async def test_a_continuation_that_ends_on_what_might_have_been_a_restatement_keeps_it(proxy_factory, upstream, client):
    """' the cat sat' could begin a restatement of 'the cat sat on the mat' until the continuation ended right there
    (no finish_reason, then [DONE]): then it was the reply's own last words."""
    proxy = await proxy_factory(OPENAI_PREFILL)
    first = split_words("Once upon a time the cat sat on the mat and more")
    upstream.script("chat/completions", Stream(chunks=first, drop_after=len(first) - 2),
                    Stream(chunks=split_words(" the cat sat"), finish_reason=None))
    read = await read_stream(client, proxy)
    assert read.text == "Once upon a time the cat sat on the mat the cat sat" and not read.errors


async def test_a_spent_retry_budget_is_not_spent_further_on_a_continuation(proxy_factory, upstream, client):
    proxy = await proxy_factory({**OPENAI_PREFILL, "retry_budget": {"percent": 0, "min_per_second": 0}})
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3))
    read = await read_stream(client, proxy)
    assert [e["code"] for e in read.errors] == ["stream_interrupted"] and len(upstream.received) == 1
    assert "not resumed after a drop at 15 chars (the retry budget is spent)" in proxy.flows[-1].comment


async def test_prefix_mode_marks_the_message(proxy_factory, upstream, client):
    proxy = await proxy_factory({**OPENAI_PREFILL, "target_proxy": {"prefill": "prefix"}})
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Stream(chunks=WORDS))
    assert (await read_stream(client, proxy)).text == REPLY
    assert continuation_of(upstream.received[1])["prefix"] is True


async def test_a_continuation_is_retried_before_its_first_content(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Status(503), Stream(chunks=WORDS))
    read = await read_stream(client, proxy)
    assert_one_ordinary_openai_reply(read)
    assert len(upstream.received) == 3


async def test_the_usage_of_a_continued_openai_stream_counts_both_parts(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Stream(chunks=WORDS, usage=True))
    read = await read_stream(client, proxy)
    [usage] = [e["usage"] for e in read.events if e.get("usage")]
    assert usage["completion_tokens"] == 3 + (len(WORDS) - 3)


async def test_a_continuation_with_nothing_to_add_completes_the_reply(proxy_factory, upstream, client):
    """The stream ended after the reply's last word but before its finish: the continuation finishes at once, with no
    content. That is the reply complete, not a blank reply to retry."""
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, no_done=True, finish_reason=None), Stream(chunks=WORDS))
    assert_one_ordinary_openai_reply(await read_stream(client, proxy))
    assert len(upstream.received) == 2
    upstream.script("messages", MessageStream(chunks=WORDS, stop_reason=None, no_stop=True), MessageStream(chunks=WORDS))
    read = await read_events(client, proxy, STREAM_MESSAGE)
    assert (read.text, read.errors, read.names[-1], read.names.count("message_stop")) == (REPLY, [], "message_stop", 1)
    assert len(upstream.received) == 4


# --- when a reply is not continued --------------------------------------------------------------------------------


async def test_openai_compatible_targets_are_not_continued_by_default(proxy_factory, upstream, client):
    """prefill: auto is none for OpenAI-compatible chat: OpenAI's own models answer anew instead of continuing."""
    proxy = await proxy_factory()
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3))
    read = await read_stream(client, proxy)
    assert [e["code"] for e in read.errors] == ["stream_interrupted"] and len(upstream.received) == 1
    assert proxy.flows[-1].comment.startswith("1 attempt: 200, stream broke after 15 chars in ")


async def test_resume_off_keeps_the_ending_of_a_broken_stream(proxy_factory, upstream, client):
    proxy = await proxy_factory({**OPENAI_PREFILL, "streaming": {"resume": False}})
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3))
    read = await read_stream(client, proxy)
    assert read.text == "".join(WORDS[:3]) and [e["code"] for e in read.errors] == ["stream_interrupted"]
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    ("stream", "extra", "why"),
    [
        (Stream(chunks=WORDS, drop_after=3, tool_call=True), {}, "the reply was making a tool call"),
        (Stream(chunks=WORDS, drop_after=3), {"n": 2}, "several choices were asked for (n > 1)"),
        (Stream(chunks=WORDS, drop_after=3), {"logprobs": True}, "logprobs were asked for"),
    ],
    ids=["tool call", "n > 1", "logprobs"],
)
async def test_what_cannot_be_continued_ends_as_before_and_says_why(proxy_factory, upstream, client, stream, extra, why):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", stream)
    read = await read_stream(client, proxy, {**STREAM_CHAT, **extra})
    assert [e["code"] for e in read.errors] == ["stream_interrupted"] and read.data[-1] == b"[DONE]"
    assert len(upstream.received) == 1
    assert f"not resumed after a drop at " in proxy.flows[-1].comment and why in proxy.flows[-1].comment


async def test_a_refused_prefill_ends_cleanly_and_is_not_asked_again_until_a_reload(proxy_factory, upstream, client):
    proxy = await proxy_factory(CLAUDE)
    upstream.script("messages", MessageStream(chunks=WORDS, drop_after=3), PrefillRefused(), MessageStream(chunks=WORDS, drop_after=3))
    read = await read_events(client, proxy)
    assert read.text == "".join(WORDS[:3]) and [e["type"] for e in read.errors] == ["api_error"]
    assert read.names[-1] == "error" and len(upstream.received) == 2
    assert "not resumed after a drop at 15 chars (" in proxy.flows[-1].comment
    read = await read_events(client, proxy)  # the same target and model: its refusal is remembered
    assert read.errors and len(upstream.received) == 3
    proxy.config_path.write_text(proxy.config_path.read_text() + "\n# edited\n")  # a reload forgets it
    await _until_reloaded(proxy)
    upstream.script("messages", MessageStream(chunks=WORDS, drop_after=3), MessageStream(chunks=WORDS))
    assert (await read_events(client, proxy)).text == REPLY


async def test_an_openai_compatible_target_that_refuses_the_prefill_ends_the_stream_as_before(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), PrefillRefused())
    read = await read_stream(client, proxy, STREAM_CHAT)
    assert [e["code"] for e in read.errors] == ["stream_interrupted"] and read.data[-1] == b"[DONE]"
    assert len(upstream.received) == 2
    assert "not resumed after a drop at 15 chars (upstream answered 400)" in proxy.flows[-1].comment


async def _until_reloaded(proxy) -> None:
    before = proxy.shared.snapshot
    await until(lambda: proxy.shared.snapshot is not before)


async def test_a_continuation_that_fails_ends_the_stream_as_before_with_heartbeats_meanwhile(
    proxy_factory, upstream, client
):
    proxy = await proxy_factory({
        "target_proxy": {"prefill": "assistant", "timeout": 0.3},
        "error_handling": {"max_retries": 1, "hedge_on_timeout": False},
        "streaming": {"heartbeat_interval": 0.2},
    })
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Hang(), Hang())
    read = await read_stream(client, proxy)
    assert read.text == "".join(WORDS[:3]) and [e["code"] for e in read.errors] == ["stream_interrupted"]
    assert read.heartbeats >= 2 and read.data[-1] == b"[DONE]"  # kept alive while the continuation was tried
    assert len(upstream.received) == 3
    assert "not resumed after a drop at 15 chars (no response from upstream in time)" in proxy.flows[-1].comment


# --- what shows -----------------------------------------------------------------------------------------------------


async def test_a_resumed_stream_shows_in_its_flow_attempt_flows_and_metrics(proxy_factory, upstream, client):
    proxy = await proxy_factory(OPENAI_PREFILL)
    upstream.script("chat/completions", Stream(chunks=WORDS, drop_after=3), Stream(chunks=WORDS))
    await read_stream(client, proxy)
    flow = proxy.flows[-1]
    assert flow.comment.startswith("2 attempts: 200, continuation 200 → resumed after a drop at 15 chars in ")
    broke, went_on = sorted(proxy.attempt_flows, key=lambda f: f.metadata["seaking"]["attempt"])
    assert broke.comment.startswith("attempt 1 of 2: 200, stream broke after 15 chars in ") and "→ resumed" in broke.comment
    assert broke.error.msg.startswith("upstream connection dropped in the middle of the stream")
    assert went_on.comment.startswith("attempt 2 of 2 (continuation 1): 200 → success")
    assert json.loads(went_on.request.content)["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:3])}
    assert flow.metadata["seaking"]["resumes"] == [{"after": "stream_interrupted", "at_chars": 15, "outcome": "continued"}]
    samples = await scrape(client, proxy)
    resumes = {
        dict(labels)["outcome"]: value for (name, labels), value in samples.items() if name == "seaking_stream_resumes_total"
    }
    assert resumes == {"continued": 1.0}


def test_an_untrimmed_prefills_whitespace_is_the_continuations_own():
    """Found by Hypothesis: an OpenAI-shape prefill goes upstream whole, trailing newline included, so a continuation
    that starts with a newline means a second one (a paragraph), not the first one again."""
    seam = Seam("000\n", trimmed=False)
    assert seam.feed("\n0 0") + seam.flush() == "\n0 0"
    claude = Seam("Once upon ", trimmed=True)  # Anthropic's prefill went without its trailing space
    assert claude.feed(" a time") + claude.flush() == "a time"


def test_whitespace_after_a_restatement_is_not_doubled_when_it_comes_in_the_next_delta():
    """Found by Hypothesis: the restated words ended one delta, the space after them began the next."""
    seam = Seam("000 0000 00000 000000 0 ", trimmed=False)
    assert seam.feed(" 00000 000000 0") == "" and seam.feed(" 0") + seam.flush() == "0"


CHAT = {"messages": [{"role": "user", "content": "Go"}]}


@pytest.mark.parametrize(
    ("request_body", "reply", "why"),
    [
        ({"messages": []}, Reply(pieces=["Hi"]), "the request has no messages"),
        ({"prompt": "Hi"}, Reply(pieces=["Hi"]), "the request has no messages"),
        (CHAT, Reply(pieces=["Hi"], reasoning=True), "the reply had reasoning in it"),
        ({**CHAT, "thinking": {"type": "enabled", "budget_tokens": 1024}}, Reply(pieces=["Hi"]), "extended thinking is on"),
        (CHAT, Reply(pieces=[" \n"]), "no reply text had come yet"),
        ({**CHAT, "thinking": {"type": "disabled"}}, Reply(pieces=["Hi"]), None),
    ],
)
def test_why_a_reply_cannot_be_continued(request_body, reply, why):
    assert why_not_continued(request_body, ANTHROPIC, reply) == why


@pytest.mark.parametrize(
    ("last_content", "api", "continued"),
    [
        # The last text part grows; parts that are not text stay as they were.
        ([{"type": "image", "source": {}}, {"type": "text", "text": "Once "}], OPENAI,
         [{"type": "image", "source": {}}, {"type": "text", "text": "Once upon a time "}]),
        ([{"type": "image", "source": {}}], OPENAI, [{"type": "image", "source": {}}, {"type": "text", "text": "upon a time "}]),
        # Claude refuses a prefill that ends in whitespace: its last text part is trimmed.
        ([{"type": "text", "text": "Once "}], ANTHROPIC, [{"type": "text", "text": "Once upon a time"}]),
    ],
)
def test_a_continuation_extends_a_prefill_made_of_parts(last_content, api, continued):
    body = json.dumps({"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": last_content}]})
    document = json.loads(Continuation("upon a time ", generated=3).body(body.encode(), Prefill.ASSISTANT, api))
    assert document["messages"][-1] == {"role": "assistant", "content": continued}


def spliced(api, client_pieces: list[str], continuation: list[tuple[str | None, dict]]) -> tuple[str, list[dict]]:
    """The client's reply text after a continuation's events went through the splicer, and what it was sent of them."""
    client = client_after(api, client_pieces)
    splicer, sent = splicer_for(api, client.reply), []
    for name, data in continuation:
        event = parse_event(written(name, data))
        for out in splicer.splice(event, read(api, event)):
            client.sent(out, read(api, parse_event(out)))
            sent.append(json.loads(parse_event(out).data))
    return client.reply.text, sent


def test_text_held_at_the_seam_goes_out_before_what_ends_it():
    """' on the' could begin a restatement of 'on the mat.' until something other than text comes: then it is the
    reply's own, sent before that something (OpenAI's finish, Claude's citation delta or block stop)."""
    text, sent = spliced(OPENAI, ["The cat sat on the mat."], [(None, openai_chunk(" on the")), (None, openai_chunk("", "stop"))])
    assert text == "The cat sat on the mat. on the" and sent[-1]["choices"][0]["finish_reason"] == "stop"
    citation = {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {}}}
    for ending in (citation, {"type": "content_block_stop", "index": 0}):
        text, sent = spliced(ANTHROPIC, ["The cat sat on the mat."], [
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " on the"}}),
            (ending["type"], ending),
        ])
        assert text == "The cat sat on the mat. on the" and sent[-1] == ending


def test_a_chunk_in_a_shape_of_its_own_is_passed_on_as_the_clients():
    [sent] = spliced(OPENAI, ["Once upon a time"], [(None, {"id": "x", "choices": ["not a choice"]})])[1]
    assert sent["choices"] == ["not a choice"] and sent["id"] == openai_chunk("")["id"]
