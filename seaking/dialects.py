"""The two APIs the proxy speaks, and what differs between them on the wire: OpenAI's (chat/completions, completions,
embeddings, models) and Anthropic's Messages API (messages, messages/count_tokens).

A `Dialect` says how an error the proxy makes looks (a JSON document; an SSE error event once a stream has begun),
how a stream says it is complete and what is written after its last event, which events of a stream carry no content
yet (an error after them can still be retried: nothing has reached the client), and how a whole answer is told as a
stream. Everything else — retries, the relay, heartbeats, ending every broken stream — is the same for both.

A request's dialect follows from its endpoint; a request to any other path that carries Anthropic's `anthropic-version`
header (an Anthropic client listing /v1/models, say) is answered in Anthropic's dialect too.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Container

from mitmproxy import http

from seaking.errors import ProxyError, reason_phrase
from seaking.routing import ANTHROPIC_ENDPOINTS, endpoint_of

DONE = b"data: [DONE]\n\n"


class Dialect(abc.ABC):
    """One API's wire shapes; OPENAI and ANTHROPIC below are the two the proxy speaks."""

    # Sent while a committed stream waits for the upstream's first event. An SSE comment for both APIs: every SSE
    # parser drops it before any event handling (the openai and anthropic SDKs' decoders, SillyTavern's
    # EventSourceStream), and these heartbeats always come before the upstream's first event — for Anthropic, before
    # message_start, where its own API never sends a `ping` and where a client's message accumulator that meets any
    # event may fail ("Unexpected event order ... before message_start").
    heartbeat = b": keep-alive\n\n"
    end_of_stream = b""  # written after a stream's last event, the proxy's error event included
    complete_ending = ""  # for people: what a complete stream ends with

    @abc.abstractmethod
    def error_document(self, error: ProxyError) -> dict:
        """The JSON body of an error answer."""

    @abc.abstractmethod
    def error_event(self, error: ProxyError) -> bytes:
        """The SSE event that reports an error once a stream has begun."""

    @abc.abstractmethod
    def is_end(self, payload: bytes) -> bool:
        """The data of a stream's last event."""

    @abc.abstractmethod
    def is_finish(self, payload: bytes) -> bool:
        """Data that says the reply is complete, even if the stream's own last event never comes."""

    def is_preamble(self, payload: bytes) -> bool:
        """Data of an event that carries no content yet, so that an error after it can still be retried."""
        return False

    @abc.abstractmethod
    def whole_as_stream(self, body: bytes) -> bytes | None:
        """A whole (non-streaming) answer as the stream the client asked for; None if it is not one."""

    def error_response(self, error: ProxyError) -> http.Response:
        # Every error the proxy answers with is final: it has retried what was worth retrying, or retrying cannot
        # help. The official SDKs retry 408, 409, 429 and 5xx by themselves unless the answer says otherwise, which
        # would multiply our attempts by three.
        headers = {"content-type": "application/json", "x-should-retry": "false"}
        if error.retry_after is not None:
            headers["retry-after"] = str(error.retry_after)
        response = http.Response.make(error.status, json.dumps(self.error_document(error)).encode(), headers)
        response.reason = reason_phrase(error.short or error.message)
        return response


class OpenAIDialect(Dialect):
    """`{"error": {"message", "type", "code"}}`; a stream of `data:` events ends with `data: [DONE]`."""

    end_of_stream = DONE
    complete_ending = "no [DONE] and no finish_reason"
    _TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }
    _FINISH = re.compile(rb'"finish_reason"\s*:\s*"')

    def error_document(self, error: ProxyError) -> dict:
        default_type = self._TYPES.get(error.status, "api_error" if error.status < 500 else "upstream_error")
        return {"error": {"message": error.message, "type": error.type or default_type, "code": error.code, **error.extras()}}

    def error_event(self, error: ProxyError) -> bytes:
        # SillyTavern shows its message; the openai SDK raises it as APIError.
        return b"data: " + json.dumps(self.error_document(error)).encode() + b"\n\n"

    def is_end(self, payload: bytes) -> bool:
        return payload == b"[DONE]"

    def is_finish(self, payload: bytes) -> bool:
        return self._FINISH.search(payload) is not None

    def whole_as_stream(self, body: bytes) -> bytes | None:
        """A chat or text completion as one chunk event per choice, then [DONE]."""
        document = _json_object(body)
        choices = document.get("choices") if document else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            return None
        streamed = []
        for index, choice in enumerate(choices):
            delta = {"delta": choice["message"]} if "message" in choice else {"text": choice.get("text", "")}
            streamed.append({"index": choice.get("index", index), **delta, "finish_reason": choice.get("finish_reason") or "stop"})
        event = {**document, "object": "chat.completion.chunk", "choices": streamed}
        return b"data: " + json.dumps(event).encode() + b"\n\n" + DONE


class AnthropicDialect(Dialect):
    """`{"type": "error", "error": {"type", "message"}}`; a stream of named events ends with `message_stop` and
    nothing after it (no [DONE]); an error in a stream is `event: error`, which the anthropic SDK raises as
    APIStatusError and SillyTavern shows (a bare `data: {"error": ...}` line, OpenAI's way, the SDK drops unread)."""

    complete_ending = "no message_stop"
    # Anthropic's error types by status; "new types may appear", and clients go by the status first.
    _TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
    _STOP = re.compile(rb'"type"\s*:\s*"message_stop"')

    def error_document(self, error: ProxyError) -> dict:
        default_type = "invalid_request_error" if 400 <= error.status < 500 else "api_error"
        error_type = self._TYPES.get(error.status, default_type)
        return {"type": "error", "error": {"type": error_type, "message": error.message, "code": error.code, **error.extras()}}

    def error_event(self, error: ProxyError) -> bytes:
        return _named_event("error", self.error_document(error))

    def is_end(self, payload: bytes) -> bool:
        return self._STOP.search(payload) is not None

    def is_finish(self, payload: bytes) -> bool:
        return self.is_end(payload)  # message_delta's stop_reason is not enough: clients wait for message_stop

    def is_preamble(self, payload: bytes) -> bool:
        # Only the events before the first content are judged, so parsing each costs nothing worth saving.
        event = _json_object(payload) or {}
        kind = event.get("type")
        if kind in ("ping", "content_block_stop", "message_delta"):
            return True
        if kind == "message_start":
            return not _has_text((event.get("message") or {}).get("content"))
        if kind == "content_block_start":
            return not _has_text([event.get("content_block")])
        return False  # content_block_delta, message_stop, and event types Anthropic may add

    def whole_as_stream(self, body: bytes) -> bytes | None:
        """A message as the events Anthropic would have streamed: text as one text_delta per block (what SillyTavern
        reads), other blocks whole in their content_block_start (what the SDK's accumulator keeps)."""
        message = _json_object(body)
        if not message or message.get("type") != "message" or not isinstance(message.get("content"), list):
            return None
        blocks = message["content"]
        if not all(isinstance(block, dict) for block in blocks):
            return None
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        events = [_named_event("message_start", {"type": "message_start", "message": start})]
        for index, block in enumerate(blocks):
            text = block.get("text") if block.get("type") == "text" else None
            opened = {**block, "text": ""} if text is not None else block
            events.append(_named_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": opened}))
            if text:
                delta = {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}
                events.append(_named_event("content_block_delta", delta))
            events.append(_named_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
        stop = {"stop_reason": message.get("stop_reason") or "end_turn", "stop_sequence": message.get("stop_sequence")}
        events.append(_named_event(
            "message_delta", {"type": "message_delta", "delta": stop, "usage": {"output_tokens": usage.get("output_tokens", 0)}}
        ))
        events.append(_named_event("message_stop", {"type": "message_stop"}))
        return b"".join(events)


OPENAI = OpenAIDialect()
ANTHROPIC = AnthropicDialect()


def dialect_for(endpoint: str | None, headers: Container[str]) -> Dialect:
    """The API a request speaks: from its endpoint (routing.endpoint_of), or Anthropic's version header elsewhere.
    `headers` must look names up case-insensitively (mitmproxy's Headers do)."""
    if endpoint in ANTHROPIC_ENDPOINTS or "anthropic-version" in headers:
        return ANTHROPIC
    return OPENAI


def dialect_of(request: http.Request) -> Dialect:
    """The API a client's request speaks, from its path and headers alone (before the exchange routes it)."""
    return dialect_for(endpoint_of(request.path), request.headers)


def _named_event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def _json_object(body: bytes) -> dict | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _has_text(blocks) -> bool:
    return isinstance(blocks, list) and any(isinstance(b, dict) and (b.get("text") or b.get("thinking")) for b in blocks)
