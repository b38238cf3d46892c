"""The stream path on inputs nobody wrote by hand (Hypothesis): SSE in any split of bytes, any line endings, comments
and fields, multi-byte UTF-8; every broken stream ended with exactly one error event; and a continuation spliced into
the client's stream so that the client's text is the upstream's whole text, whatever the cut and the seam."""

from __future__ import annotations

import json

from hypothesis import assume, given
from hypothesis import strategies as st

from seaking.dialects import ANTHROPIC, OPENAI, Dialect
from seaking.errors import ProxyError
from seaking.splice import MIN_RESTATED_CHARS, MIN_RESTATED_WORDS, Seam, splicer_for
from seaking.sse import SseFramer, event_bytes, parse_event
from seaking.streaming import ClientStream, Reply, read

DROPPED = ProxyError(502, "dropped", "stream_interrupted")
LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)  # emoji, CJK, ...


# --- events, as upstreams write them ------------------------------------------------------------------------------


def openai_chunk(text: str, finish: str | None = None, first: bool = False) -> dict:
    delta = {"content": text} if text else {}
    if first:
        delta["role"] = "assistant"
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def openai_stream(pieces: list[str], complete: bool) -> list[tuple[str | None, dict | str]]:
    events = [(None, openai_chunk(p, first=i == 0)) for i, p in enumerate(pieces)]
    if complete:
        events += [(None, openai_chunk("", "stop")), (None, "[DONE]")]
    return events


def anthropic_stream(pieces: list[str], complete: bool) -> list[tuple[str | None, dict | str]]:
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                                  "usage": {"input_tokens": 5, "output_tokens": 1}}}
    events = [("message_start", start),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
              ("ping", {"type": "ping"})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})
               for p in pieces]
    if complete:
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": len(pieces)}}),
                   ("message_stop", {"type": "message_stop"})]
    return events


@st.composite
def sse_bytes(draw, events: list[tuple[str | None, dict | str]]) -> tuple[list[bytes], bytes]:
    """The events as one upstream might write them: any line ending, comments, id: and retry: lines. Returns each
    event's bytes and the whole stream."""
    end = draw(LINE_ENDS)
    written = []
    for name, data in events:
        lines = []
        if draw(st.booleans()):
            lines.append(b": " + draw(TEXT).replace("\r", " ").replace("\n", " ").encode())
        if name:
            lines.append(b"event: " + name.encode())
        if draw(st.booleans()):
            lines.append(b"id: " + str(draw(st.integers(0, 99))).encode())
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=draw(st.booleans()))
        lines.append(b"data: " + payload.encode())
        written.append(end.join(lines) + end + end)
    return written, b"".join(written)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({min(p, len(data)) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- framing ------------------------------------------------------------------------------------------------------


@given(st.data(), st.lists(TEXT, max_size=8), st.booleans(), st.sampled_from([OPENAI, ANTHROPIC]))
def test_any_split_of_any_stream_gives_the_same_events_in_order_each_once(data, pieces, complete, api):
    events = (openai_stream if api is OPENAI else anthropic_stream)(pieces, complete)
    written, stream = data.draw(sse_bytes(events))
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    framer = SseFramer()
    framed = [event for chunk in cut(stream, points) for event in framer.feed(chunk)] + framer.end()
    assert [e.raw for e in framed] == written and framer.partial == b""
    reply = Reply()
    for event in framed:
        reply.add(read(api, event))
    assert reply.text == "".join(pieces)  # multi-byte characters split across chunks come out whole
    assert reply.ended == complete


@given(st.data(), st.lists(TEXT, min_size=1, max_size=8), st.sampled_from([OPENAI, ANTHROPIC]),
       st.sampled_from([DROPPED, None]))
def test_a_stream_cut_anywhere_ends_with_exactly_one_error_event_its_own(data, pieces, api, problem):
    """What reaches the client is whole events only; what ends it is read as events of its own, and a reply that
    broke before its end gets exactly one error event (never a second after the upstream's own), then its end."""
    events = (openai_stream if api is OPENAI else anthropic_stream)(pieces, complete=False)
    if data.draw(st.booleans()):  # the upstream's own error event after content
        error = {"error": {"message": "overloaded"}} if api is OPENAI else {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        events.append(("error" if api is ANTHROPIC else None, error))
    _, stream = data.draw(sse_bytes(events))
    broke_at = data.draw(st.integers(0, len(stream)))
    framer, client = SseFramer(), ClientStream(api)
    sent = b"".join(client.sent(e.raw, read(api, e)) for e in framer.feed(stream[:broke_at]))
    tail, reported = client.ending(problem)
    framed = SseFramer().feed(sent + tail)
    assert b"".join(e.raw for e in framed) == sent + tail  # every byte the client gets is part of a whole event
    errors = [e for e in framed if e.data and read(api, e).error]
    assert len(errors) == 1 and reported is not None
    if api is OPENAI:
        assert framed[-1].data == b"[DONE]" and [e.data for e in framed].count(b"[DONE]") == 1
    else:
        assert framed[-1] is errors[0] or framed[-1].name == "error"


# --- the continuation splice ----------------------------------------------------------------------------------------


WORD = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=6)
SPACE = st.sampled_from([" ", " ", " ", "\n", "\n\n", "  "])


@st.composite
def reply_texts(draw) -> str:
    words = draw(st.lists(WORD, min_size=2, max_size=30))
    return "".join(w + (draw(SPACE) if i < len(words) - 1 else "") for i, w in enumerate(words))


def pieces_of(text: str, draw) -> list[str]:
    """The text as a stream's deltas: cut anywhere (inside words, inside whitespace)."""
    points = draw(st.lists(st.integers(1, max(1, len(text))), max_size=8))
    return [p for p in (text[a:b] for a, b in zip([0, *sorted(set(points))], [*sorted(set(points)), len(text)])) if p]


def written(name: str | None, data: dict | str) -> bytes:
    """One event of openai_stream or anthropic_stream, as the proxy writes an event."""
    return event_bytes((data if isinstance(data, str) else json.dumps(data)).encode(), name)


def client_after(api: Dialect, pieces: list[str]) -> ClientStream:
    client = ClientStream(api)
    events = (openai_stream if api is OPENAI else anthropic_stream)(pieces, complete=False)
    for name, data in events:
        raw = written(name, data)
        client.sent(raw, read(api, parse_event(raw)))
    return client


def restated(prefill: str, words: int) -> str:
    """The last `words` words of `prefill`, as a model that restates its prefill begins its continuation."""
    return " ".join(prefill.split()[-words:])


@given(st.data(), reply_texts(), st.sampled_from([OPENAI, ANTHROPIC]))
def test_the_clients_text_is_the_upstreams_whole_text_whatever_the_cut_and_the_seam(data, whole, api):
    cut_at = data.draw(st.integers(1, len(whole) - 1))
    first = whole[:cut_at]
    assume(first.strip())  # a continuation needs some reply text
    client = client_after(api, pieces_of(first, data.draw))
    prefill = first.rstrip() if api is ANTHROPIC else first  # what the continuation request carries
    continuation = whole[len(prefill):]
    words = data.draw(st.sampled_from([0, MIN_RESTATED_WORDS, MIN_RESTATED_WORDS + 2]))
    restatement = restated(prefill, words) if words else ""
    if words:
        assume(len(prefill.split()) >= words and len(restatement) >= MIN_RESTATED_CHARS)
        # The restated words begin at a word boundary of what the client has.
        assume(prefill.rstrip().endswith(restatement) and prefill.rstrip()[: -len(restatement)][-1:].isspace())
        # The model says the last words again, then goes on from them: with the text that followed them.
        continuation = " " + restatement + whole[len(prefill.rstrip()):]
    else:
        # Without a restatement, the rule must leave the continuation alone: unless its start happens to repeat the
        # last three-plus words exactly, which is what the rule removes (and what is too rare to matter in real text).
        seam = Seam(client.reply.text, trimmed=api is ANTHROPIC)
        assume(not any(continuation.lstrip().startswith(c) for c in seam._candidates))
    splicer = splicer_for(api, client.reply)
    stream = (openai_stream if api is OPENAI else anthropic_stream)(pieces_of(continuation, data.draw), complete=True)
    for name, payload in stream:
        event = parse_event(written(name, payload))
        for out in splicer.splice(event, read(api, event)):
            client.sent(out, read(api, parse_event(out)))
    assert splicer.flush() == []  # the stream's own ending let go of what the seam held: the proxy flushes no more
    assert client.reply.text == whole
    assert client.ending(None)[1] is None  # one whole, complete reply


@given(reply_texts(), st.integers(0, 2))
def test_a_short_repeat_at_the_seam_is_never_removed(text, words):
    """Fewer than MIN_RESTATED_WORDS words repeated at the seam are the reply's own words: kept."""
    assume(words < MIN_RESTATED_WORDS and len(text.split()) >= words)
    repeat = (" " + restated(text.rstrip(), words)) if words else ""
    seam = Seam(text.rstrip(), trimmed=False)
    out = seam.feed(repeat + " and on") + seam.flush()
    assert out == repeat + " and on"
