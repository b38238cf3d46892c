"""streaming.py's and dialects.py's pure parts alone: following SSE across chunk boundaries, how a stream is closed,
and what each API's errors and streams look like."""

from __future__ import annotations

import json

import pytest
from mitmproxy.http import Headers

from seaking.dialects import ANTHROPIC, DONE, OPENAI, dialect_for
from seaking.errors import ProxyError
from seaking.sse import SseFramer
from seaking.streaming import ClientStream, Reply, is_event_stream, read

DROPPED = ProxyError(502, "dropped", "stream_interrupted")


def follow(*chunks: bytes, api=OPENAI) -> tuple[Reply, SseFramer]:
    """What a stream's events said, fed in these chunks."""
    framer, reply = SseFramer(), Reply()
    for chunk in chunks:
        for event in framer.feed(chunk):
            reply.add(read(api, event))
    return reply, framer


def sent(*chunks: bytes, api=OPENAI) -> ClientStream:
    """A client stream that was sent these events."""
    client = ClientStream(api)
    for chunk in chunks:
        for event in SseFramer().feed(chunk):
            client.sent(event.raw, read(api, event))
    return client


def test_events_are_framed_across_chunk_boundaries():
    framer = SseFramer()
    assert [e.raw for e in framer.feed(b": comment\n\n")] == [b": comment\n\n"]
    assert framer.feed(b'data: {"fin') == [] and framer.feed(b'ish_reason": "stop"}\r') == []
    assert framer.feed(b"\n") == []  # the event's blank line is still to come
    [event] = framer.feed(b"\r\n")
    assert event.raw == b'data: {"finish_reason": "stop"}\r\n\r\n' and framer.partial == b""
    assert read(OPENAI, event).finish


@pytest.mark.parametrize(
    ("chunks", "ended", "finished", "errors"),
    [
        ([b"data: [DONE]\n\n"], True, False, 0),
        ([b'data: {"choices": [{"finish_reason": "stop"}]}\n\n'], False, True, 0),
        ([b'data: {"choices": [{"finish_reason": null}]}\n\n'], False, False, 0),
        ([b'event: message_stop\ndata: {"type": "message_stop"}\n\n'], False, False, 0),  # not OpenAI's
        ([b'data: {"error": {"message": "x"}}\n\n'], False, False, 1),
        ([b'data: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'], False, False, 1),
        ([b'data: {"content": "the word \\"error\\" in text"}\n\n'], False, False, 0),
        ([b'data: {"fin', b'ish_reason": "length"}\n\n'], False, True, 0),
    ],
)
def test_what_the_events_say(chunks, ended, finished, errors):
    reply, _ = follow(*chunks)
    assert (reply.ended, reply.finished, reply.errors) == (ended, finished, errors)


def test_a_complete_stream_needs_no_ending():
    assert sent(b"data: 1\n\ndata: [DONE]\n\n").ending(None) == (b"", None)
    assert sent(b"data: 1\n\ndata: [DONE]\n\n").ending(DROPPED) == (b"", None)


def test_a_finished_stream_without_done_gets_done():
    assert sent(b'data: {"finish_reason": "stop"}\n\n').ending(None) == (DONE, None)


def test_an_unfinished_stream_gets_one_error_event_then_done():
    tail, problem = sent(b"data: 1\n\n").ending(None)
    assert problem.code == "stream_incomplete"
    assert tail == OPENAI.error_event(problem) + DONE


def test_a_half_event_is_held_back_and_the_error_event_after_a_drop_is_one_of_its_own():
    """Only whole events are ever sent: the error event after a drop is read as one of its own."""
    reply, framer = follow(b"data: 1\n\ndata: {\"cho")
    assert framer.partial == b'data: {"cho' and reply.deltas == 1
    tail, problem = sent(b"data: 1\n\n").ending(DROPPED)
    assert problem is DROPPED and tail == OPENAI.error_event(DROPPED) + DONE


def test_an_upstream_error_event_is_not_doubled():
    tail, problem = sent(b'data: {"error": {"message": "upstream said"}}\n\n').ending(DROPPED)
    assert tail == DONE and problem is DROPPED


def test_the_error_event_has_the_fields_clients_read():
    event = OPENAI.error_event(ProxyError(502, "dropped", "stream_interrupted", attempts=2))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "error": {"message": "dropped", "type": "upstream_error", "code": "stream_interrupted", "attempts": 2}
    }


def test_a_completion_as_a_stream():
    body = json.dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}]}).encode()
    data, done = OPENAI.whole_as_stream(body).split(b"\n\n", 1)
    event = json.loads(data[6:])
    assert event["object"] == "chat.completion.chunk"
    assert event["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}]
    assert done == DONE
    text = json.loads(OPENAI.whole_as_stream(b'{"choices": [{"text": "t"}]}').split(b"\n\n")[0][6:])
    assert text["choices"] == [{"index": 0, "text": "t", "finish_reason": "stop"}]


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"choices": "x"}', b'{"choices": [1]}', b"{}"])
def test_completion_as_sse_refuses_what_is_not_a_completion(body):
    assert OPENAI.whole_as_stream(body) is None


def test_small_predicates():
    assert is_event_stream("text/event-stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not OPENAI.read_event(b"[DONE]").error
    assert not OPENAI.read_event(b'{"error": null}').error


# --- Anthropic's dialect ---------------------------------------------------------------------------------------------


def anthropic_event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE_START = anthropic_event("message_start", {"type": "message_start", "message": {"type": "message", "content": []}})
BLOCK_START = anthropic_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
PING = anthropic_event("ping", {"type": "ping"})
DELTA = anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})
STOP = anthropic_event("message_stop", {"type": "message_stop"})
STOP_REASON = anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}})
OVERLOADED = anthropic_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.mark.parametrize(
    ("chunks", "content", "error_first"),
    [
        ([MESSAGE_START, BLOCK_START, PING], False, False),  # no text yet
        ([MESSAGE_START, PING, OVERLOADED], False, True),  # an error before any content can still be retried
        ([MESSAGE_START, BLOCK_START, DELTA], True, False),
        ([MESSAGE_START, BLOCK_START, DELTA, OVERLOADED], True, False),  # after content: passed on, not retried
        ([MESSAGE_START, STOP], True, False),  # an empty reply is complete
        ([anthropic_event("message_start", {"type": "message_start", "message": {"content": [{"type": "text", "text": "Sure"}]}})], True, False),
        ([anthropic_event("brand_new_event", {"type": "brand_new_event"})], True, False),
    ],
)
def test_what_counts_as_content_in_an_anthropic_stream(chunks, content, error_first):
    reply, _ = follow(*chunks, api=ANTHROPIC)
    events = [read(ANTHROPIC, e) for chunk in chunks for e in SseFramer().feed(chunk)]
    first_error = next((i for i, f in enumerate(events) if f.error), None)
    first_content = next((i for i, f in enumerate(events) if f.content or f.end), None)
    # As read_first_event judges it: content (or the end) came, and whether an error came before it.
    assert (reply.has_content or reply.ended, first_error is not None and (first_content is None or first_error < first_content)) == (
        content, error_first
    )


def test_an_anthropic_stream_ends_with_message_stop_and_nothing_after_it():
    assert sent(MESSAGE_START, DELTA, STOP, api=ANTHROPIC).ending(None) == (b"", None)
    assert sent(MESSAGE_START, DELTA, STOP, api=ANTHROPIC).ending(DROPPED) == (b"", None)
    tail, problem = sent(MESSAGE_START, DELTA, api=ANTHROPIC).ending(None)
    assert problem.code == "stream_incomplete" and "no message_stop" in problem.message
    assert tail == ANTHROPIC.error_event(problem)
    assert sent(MESSAGE_START, DELTA, api=ANTHROPIC).ending(DROPPED) == (ANTHROPIC.error_event(DROPPED), DROPPED)
    assert sent(MESSAGE_START, DELTA, OVERLOADED, api=ANTHROPIC).ending(DROPPED) == (b"", DROPPED)  # never doubled
    # A stop_reason finishes the reply: an end without message_stop gets one from the proxy.
    assert sent(MESSAGE_START, DELTA, STOP_REASON, api=ANTHROPIC).ending(None) == (ANTHROPIC.end_after_finish, None)
    assert ANTHROPIC.end_after_finish == STOP


def test_anthropics_error_event_and_document():
    error = ProxyError(529, "Upstream overloaded; gave up after 4 attempts.", "upstream_http_529", attempts=4)
    event = ANTHROPIC.error_event(error)
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": error.message, "code": "upstream_http_529", "attempts": 4},
    }


@pytest.mark.parametrize(
    ("status", "anthropic_type"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
     (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
     (503, "api_error"), (504, "timeout_error"), (529, "overloaded_error"), (422, "invalid_request_error")],
)
def test_anthropic_error_types_follow_the_status(status, anthropic_type):
    # OpenAI's own type (here: the guard's) does not leak into Anthropic's document.
    document = ANTHROPIC.error_document(ProxyError(status, "m", "c", type="invalid_request_error"))
    assert document["error"]["type"] == anthropic_type


def test_both_apis_error_responses_say_x_should_retry_false():
    for api in (OPENAI, ANTHROPIC):
        response = api.error_response(ProxyError(503, "gave up", "upstream_http_503", retry_after=7))
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["retry-after"] == "7"
        assert response.headers["content-type"] == "application/json"


def test_a_message_as_a_stream():
    body = json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "max_tokens",
        "content": [{"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }).encode()
    events = [block.split(b"\ndata: ") for block in ANTHROPIC.whole_as_stream(body).split(b"\n\n") if block]
    names = [name[len(b"event: "):].decode() for name, _ in events]
    data = [json.loads(payload) for _, payload in events]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_stop", "message_delta", "message_stop"]
    assert [d["type"] for d in data] == names
    assert data[0]["message"]["content"] == [] and data[1]["content_block"] == {"type": "text", "text": ""}
    assert data[2]["delta"] == {"type": "text_delta", "text": "hi"}
    assert data[4]["content_block"]["input"] == {"a": 1}  # whole, as the SDK's accumulator keeps it
    assert data[6]["delta"]["stop_reason"] == "max_tokens" and data[6]["usage"] == {"output_tokens": 2}


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"type": "message", "content": "x"}', b'{"type": "message", "content": [1]}'])
def test_what_is_not_a_message_is_not_made_a_stream(body):
    assert ANTHROPIC.whole_as_stream(body) is None


def test_the_dialect_of_a_request():
    assert dialect_for("messages", {}) is ANTHROPIC
    assert dialect_for("messages/count_tokens", {}) is ANTHROPIC
    assert dialect_for("models", Headers(**{"Anthropic-Version": "2023-06-01"})) is ANTHROPIC
    assert dialect_for(None, Headers(**{"anthropic-version": "2023-06-01"})) is ANTHROPIC
    assert dialect_for("models", Headers()) is OPENAI
    assert dialect_for("chat/completions", Headers(authorization="Bearer x")) is OPENAI
    # The endpoint decides where it is one API's: an OpenAI stream never gets Anthropic's `event: error`.
    assert dialect_for("chat/completions", Headers(**{"anthropic-version": "2023-06-01"})) is OPENAI


def test_an_event_ended_by_cr_cr_at_the_very_end_of_a_stream_is_whole():
    """Found by Hypothesis: with CR line endings the framer waits for the byte after a CR (it may begin a CRLF), so the
    stream's last event came out only at its end."""
    framer = SseFramer()
    assert framer.feed(b'event: ping\rdata: {"type": "ping"}\r\r') == []
    [event] = framer.end()
    assert event.raw == b'event: ping\rdata: {"type": "ping"}\r\r' and event.name == "ping" and framer.end() == []
    assert SseFramer().end() == []


def facts(api, document) -> dict:
    """The facts an event's data gives, without its document: only the fields that differ from nothing."""
    payload = document if isinstance(document, bytes) else json.dumps(document).encode()
    return {k: v for k, v in vars(api.read_event(payload)).items() if k != "document" and v is not None and v is not False and v != ""}


@pytest.mark.parametrize(
    ("api", "document", "expected"),
    [
        (OPENAI, b"not json", {"content": True}),  # passed on as content, not judged
        (OPENAI, {"choices": ["not a choice", {"delta": {"content": "Hi"}}]}, {"text": "Hi", "content": True}),
        (OPENAI, {"choices": [{"index": 1, "delta": {"content": "B"}}]}, {"content": True, "other_choice": True}),
        (OPENAI, {"choices": [{"delta": {"tool_calls": [{"id": "t"}]}}]}, {"content": True, "tool_call": True}),
        (OPENAI, {"choices": [{"delta": {"reasoning_content": "hmm"}}]}, {"content": True, "reasoning": True}),
        (OPENAI, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}, {}),
        (OPENAI, {"id": "x", "finish_reason": "stop", "choices": []}, {"finish": True}),
        (OPENAI, {"something": "else"}, {"content": True}),  # a shape of its own
        (ANTHROPIC, b"not json", {"content": True}),
        (ANTHROPIC, {"type": "message_start", "message": {"id": "msg_1"}}, {}),  # no content list at all
        (ANTHROPIC, {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t"}},
         {"tool_call": True, "block": 1}),
        (ANTHROPIC, {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{"}},
         {"content": True, "tool_call": True, "block": 1}),
        (ANTHROPIC, {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "so"}},
         {"content": True, "reasoning": True, "block": 0}),
        (ANTHROPIC, {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "so"}},
         {"content": True, "reasoning": True, "block": 0}),
        (ANTHROPIC, {"type": "content_block_stop", "index": 0}, {"block": 0, "block_closed": True}),
    ],
)
def test_what_one_event_says(api, document, expected):
    assert facts(api, document) == expected


@pytest.mark.parametrize(
    ("api", "document", "blank"),
    [
        (OPENAI, {"choices": [{"message": {"content": ""}}]}, True),
        (OPENAI, {"choices": [{"message": {"content": "Hi"}}]}, False),
        (OPENAI, {"choices": [{"text": "Hi"}]}, False),  # a text completion
        (OPENAI, {"choices": [{"message": {"role": "assistant", "tool_calls": [{"id": "t"}]}}]}, False),
        (OPENAI, {"choices": ["not a choice"]}, False),  # not ours to judge
        (OPENAI, {"object": "list", "data": []}, False),  # not a completion
        (ANTHROPIC, {"type": "message", "content": []}, True),
        (ANTHROPIC, {"type": "message", "content": [{"type": "text", "text": ""}]}, True),
        (ANTHROPIC, {"type": "message", "content": [{"type": "tool_use", "id": "t"}]}, False),
        (ANTHROPIC, {"input_tokens": 12}, False),  # count_tokens
    ],
)
def test_what_is_a_blank_reply(api, document, blank):
    assert api.is_blank(document) is blank
