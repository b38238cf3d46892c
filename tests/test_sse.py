"""streaming.py's pure parts alone: following SSE across chunk boundaries, and how a stream is closed."""

from __future__ import annotations

import json

import pytest

from seaking.errors import ProxyError
from seaking.streaming import DONE, SseWatcher, completion_as_sse, is_error_payload, is_event_stream

DROPPED = ProxyError(502, "dropped", "stream_interrupted")


def watch(*chunks: bytes) -> SseWatcher:
    watcher = SseWatcher()
    for chunk in chunks:
        watcher.feed(chunk)
    return watcher


def test_events_are_counted_across_chunk_boundaries():
    watcher = watch(b'data: {"a"', b": 1}\r", b"\n", b"\r\n: comment\n\n", b"data: x\n\ndata: y\n")
    assert watcher.events == 2
    assert watcher.first_data == b'{"a": 1}'


@pytest.mark.parametrize(
    ("chunks", "done", "finish", "error"),
    [
        ([b"data: [DONE]\n\n"], True, False, False),
        ([b'data: {"choices": [{"finish_reason": "stop"}]}\n\n'], False, True, False),
        ([b'data: {"choices": [{"finish_reason": null}]}\n\n'], False, False, False),
        ([b'event: message_stop\ndata: {"type": "message_stop"}\n\n'], False, True, False),
        ([b'data: {"error": {"message": "x"}}\n\n'], False, False, True),
        ([b'data: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'], False, False, True),
        ([b'data: {"content": "the word \\"error\\" in text"}\n\n'], False, False, False),
        ([b'data: {"fin', b'ish_reason": "length"}\n\n'], False, True, False),
    ],
)
def test_what_the_watcher_sees(chunks, done, finish, error):
    watcher = watch(*chunks)
    assert (watcher.saw_done, watcher.saw_finish, watcher.saw_error) == (done, finish, error)


def test_a_complete_stream_needs_no_ending():
    assert watch(b"data: 1\n\ndata: [DONE]\n\n").ending(None, append_done=True) == (b"", None)
    assert watch(b"data: 1\n\ndata: [DONE]\n\n").ending(DROPPED, append_done=True) == (b"", None)


def test_a_finished_stream_without_done_gets_done():
    watcher = watch(b'data: {"finish_reason": "stop"}\n\n')
    assert watcher.ending(None, append_done=True) == (DONE, None)
    assert watcher.ending(None, append_done=False) == (b"", None)


def test_an_unfinished_stream_gets_one_error_event_then_done():
    tail, problem = watch(b"data: 1\n\n").ending(None, append_done=True)
    assert problem.code == "stream_incomplete"
    assert tail == problem.sse_event() + DONE


def test_a_drop_gets_its_own_error_event_on_a_fresh_line():
    tail, problem = watch(b"data: 1\n\ndata: {\"cho").ending(DROPPED, append_done=True)
    assert problem is DROPPED
    assert tail == b"\n\n" + DROPPED.sse_event() + DONE
    tail, _ = watch(b"data: 1\n").ending(DROPPED, append_done=True)
    assert tail.startswith(b"\ndata: {\"error\"")


def test_an_upstream_error_event_is_not_doubled():
    tail, problem = watch(b'data: {"error": {"message": "upstream said"}}\n\n').ending(DROPPED, append_done=True)
    assert tail == DONE and problem is DROPPED


def test_the_error_event_has_the_fields_clients_read():
    event = ProxyError(502, "dropped", "stream_interrupted", attempts=2).sse_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {
        "error": {"message": "dropped", "type": "upstream_error", "code": "stream_interrupted", "attempts": 2}
    }


def test_completion_as_sse():
    body = json.dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}]}).encode()
    data, done = completion_as_sse(body).split(b"\n\n", 1)
    event = json.loads(data[6:])
    assert event["object"] == "chat.completion.chunk"
    assert event["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}]
    assert done == DONE
    text = json.loads(completion_as_sse(b'{"choices": [{"text": "t"}]}').split(b"\n\n")[0][6:])
    assert text["choices"] == [{"index": 0, "text": "t", "finish_reason": "stop"}]


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"choices": "x"}', b'{"choices": [1]}', b"{}"])
def test_completion_as_sse_refuses_what_is_not_a_completion(body):
    assert completion_as_sse(body) is None


def test_small_predicates():
    assert is_event_stream("text/event-stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not is_error_payload(b"[DONE]")
    assert not is_error_payload(b'{"error": null}')
