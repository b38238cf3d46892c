"""The two APIs the proxy speaks, and what differs between them on the wire: OpenAI's (chat/completions, completions,
embeddings, models) and Anthropic's Messages API (messages, messages/count_tokens).

A `Dialect` says how an error the proxy makes looks (a JSON document; an SSE error event once a stream has begun),
how a stream says it is complete and what is written after its last event, which events of a stream carry no content
yet (an error after them can still be retried: nothing has reached the client), and how a whole answer is told as a
stream. Everything else — retries, the relay, heartbeats, ending every broken stream — is the same for both.

A request's dialect follows from its endpoint where the endpoint is one API's; a request to a path both APIs have, or to
any other path, that carries Anthropic's `anthropic-version` header (an Anthropic client listing /v1/models, say) is
answered in Anthropic's dialect.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Container
from dataclasses import dataclass, field

from mitmproxy import http

from seaking.errors import ProxyError, reason_phrase
from seaking.routing import ANTHROPIC_ENDPOINTS, OPENAI_ENDPOINTS, endpoint_of

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Usage:
    """Tokens the upstream reported for a reply: the prompt's (Anthropic: input, cache reads and writes) and the
    reply's own."""

    prompt: int = 0
    completion: int = 0


@dataclass(frozen=True)
class EventFacts:
    """What one SSE event's data says, as far as the proxy cares."""

    document: dict | None = field(default=None, compare=False, repr=False)  # the data, parsed (None: not JSON)
    text: str = ""  # reply text it adds (choice 0's content; Anthropic: a text block's text)
    content: bool = False  # it carries something the client shows: text, a tool call, reasoning, a refusal
    tool_call: bool = False  # a tool call or function call (its arguments are not text)
    reasoning: bool = False  # reasoning or thinking content
    other_choice: bool = False  # a choice other than the first (n > 1)
    finish: bool = False  # it says the reply is complete, even if the stream's own last event never comes
    end: bool = False  # the stream's own last event
    error: bool = False
    usage: Usage | None = None  # the usage it reports (Anthropic: message_start's input, message_delta's output)
    block: int | None = None  # Anthropic: the index of the content block a content_block_* event is about
    block_closed: bool = False  # Anthropic: content_block_stop


NO_FACTS = EventFacts()  # an event without data (a comment, a heartbeat), or a ping


class Dialect(abc.ABC):
    """One API's wire shapes; OPENAI and ANTHROPIC below are the two the proxy speaks."""

    # Sent while a committed stream waits for the upstream's first event. An SSE comment for both APIs: every SSE
    # parser drops it before any event handling (the openai and anthropic SDKs' decoders, SillyTavern's
    # EventSourceStream), and these heartbeats always come before the upstream's first event — for Anthropic, before
    # message_start, where its own API never sends a `ping` and where a client's message accumulator that meets any
    # event may fail ("Unexpected event order ... before message_start").
    heartbeat = b": keep-alive\n\n"
    end_of_stream = b""  # written after a stream's last event, the proxy's error event included
    end_after_finish = b""  # completes a stream whose reply finished but whose own last event never came
    complete_ending = ""  # for people: what a complete stream ends with

    @abc.abstractmethod
    def error_document(self, error: ProxyError) -> dict:
        """The JSON body of an error answer."""

    @abc.abstractmethod
    def error_event(self, error: ProxyError) -> bytes:
        """The SSE event that reports an error once a stream has begun."""

    @abc.abstractmethod
    def read_event(self, payload: bytes) -> EventFacts:
        """What the data of one SSE event says. Never raises: data that is not what the API sends is content."""

    @abc.abstractmethod
    def usage_of(self, document: object) -> Usage | None:
        """The usage a whole reply reports, if it does."""

    @abc.abstractmethod
    def is_blank(self, document: object) -> bool:
        """Whether a whole reply (a completion, a message) has no content at all: no text, no tool call, no refusal."""

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
    end_after_finish = DONE
    complete_ending = "no [DONE] and no finish_reason"
    _TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }

    def error_document(self, error: ProxyError) -> dict:
        default_type = self._TYPES.get(error.status, "api_error" if error.status < 500 else "upstream_error")
        return {"error": {"message": error.message, "type": error.type or default_type, "code": error.code, **error.extras()}}

    def error_event(self, error: ProxyError) -> bytes:
        # SillyTavern shows its message; the openai SDK raises it as APIError.
        return b"data: " + json.dumps(self.error_document(error)).encode() + b"\n\n"

    def read_event(self, payload: bytes) -> EventFacts:
        if payload == b"[DONE]":
            return EventFacts(end=True)
        document = _json_object(payload)
        if document is None:
            return EventFacts(content=True)
        if _is_error(document):
            return EventFacts(document, error=True)
        text, tool_call, reasoning, other_choice, finish, content = "", False, False, False, False, False
        choices = document.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            pieces = "".join(p for p in (delta.get("content"), choice.get("text")) if isinstance(p, str))  # chat, text
            calls = bool(delta.get("tool_calls") or delta.get("function_call"))
            thinks = bool(delta.get("reasoning_content") or delta.get("reasoning"))
            # The role preamble ({"role": "assistant", "content": ""}), a finish or a usage chunk carry none.
            content = content or bool(pieces or calls or thinks or delta.get("refusal"))
            finish = finish or bool(choice.get("finish_reason"))
            if choice.get("index", 0) != 0:
                other_choice = True
                continue
            text += pieces
            tool_call, reasoning = tool_call or calls, reasoning or thinks
        finish = finish or bool(document.get("finish_reason"))  # where a few upstreams put it
        if not isinstance(choices, list) and document.get("usage") is None:
            content = True  # a shape of its own: passed on as content, not judged
        return EventFacts(
            document,
            text=text,
            content=content,
            tool_call=tool_call,
            reasoning=reasoning,
            other_choice=other_choice,
            finish=finish,
            usage=self.usage_of(document),
        )

    def usage_of(self, document: object) -> Usage | None:
        usage = document.get("usage") if isinstance(document, dict) else None
        return _openai_usage(usage) if isinstance(usage, dict) else None

    def is_blank(self, document: object) -> bool:
        choices = document.get("choices") if isinstance(document, dict) else None
        if not isinstance(choices, list):
            return False  # not a completion: not ours to judge
        for choice in choices:
            if not isinstance(choice, dict):
                return False
            message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            if message.get("content") or message.get("tool_calls") or message.get("function_call") or message.get("refusal"):
                return False
            if choice.get("text"):  # a text completion
                return False
        return True

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
    end_after_finish = b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
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

    def error_document(self, error: ProxyError) -> dict:
        default_type = "invalid_request_error" if 400 <= error.status < 500 else "api_error"
        error_type = self._TYPES.get(error.status, default_type)
        return {"type": "error", "error": {"type": error_type, "message": error.message, "code": error.code, **error.extras()}}

    def error_event(self, error: ProxyError) -> bytes:
        return _named_event("error", self.error_document(error))

    def read_event(self, payload: bytes) -> EventFacts:
        document = _json_object(payload)
        if document is None:
            return EventFacts(content=True)
        kind = document.get("type")
        if kind == "error" or document.get("error"):
            return EventFacts(document, error=True)
        if kind == "message_stop":
            return EventFacts(document, end=True)
        if kind == "ping":
            return EventFacts(document)
        if kind == "message_start":
            message = document.get("message") if isinstance(document.get("message"), dict) else {}
            text = _text_of(message.get("content"))
            content = _has_text(message.get("content"))
            return EventFacts(document, text=text, content=content, usage=self.usage_of(message))
        index = document.get("index") if isinstance(document.get("index"), int) else None
        if kind == "content_block_start":
            block = document.get("content_block") if isinstance(document.get("content_block"), dict) else {}
            text = _text_of([block])
            return EventFacts(
                document, text=text, content=bool(text) or bool(block.get("thinking")), block=index,
                **_block_kind(block.get("type")),
            )
        if kind == "content_block_delta":
            delta = document.get("delta") if isinstance(document.get("delta"), dict) else {}
            text = delta.get("text") if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str) else ""
            kind_of = _block_kind(delta.get("type"))
            return EventFacts(document, text=text, content=bool(text) or bool(kind_of), block=index, **kind_of)
        if kind == "content_block_stop":
            return EventFacts(document, block=index, block_closed=True)
        if kind == "message_delta":
            # A stop_reason finishes the reply; clients still wait for message_stop, which the proxy sends itself
            # if the stream ends without it (Dialect.end_after_finish).
            delta = document.get("delta") if isinstance(document.get("delta"), dict) else {}
            return EventFacts(document, usage=self.usage_of(document), finish=bool(delta.get("stop_reason")))
        return EventFacts(document, content=True)  # event types Anthropic may add

    def usage_of(self, document: object) -> Usage | None:
        usage = document.get("usage") if isinstance(document, dict) else None
        return _anthropic_usage(usage) if isinstance(usage, dict) else None

    def is_blank(self, document: object) -> bool:
        if not isinstance(document, dict) or document.get("type") != "message" or not isinstance(document.get("content"), list):
            return False  # not a message: not ours to judge (count_tokens, ...)
        return not any(
            isinstance(block, dict) and (block.get("type") in ("tool_use", "server_tool_use") or block.get("text"))
            for block in document["content"]
        )

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
    """The API a request speaks: its endpoint's, where the endpoint is one API's (chat/completions is OpenAI's even
    with an `anthropic-version` header); elsewhere (models, other paths) Anthropic's when it carries that header.
    `headers` must look names up case-insensitively (mitmproxy's Headers do)."""
    if endpoint in ANTHROPIC_ENDPOINTS:
        return ANTHROPIC
    if endpoint in OPENAI_ENDPOINTS:
        return OPENAI
    return ANTHROPIC if "anthropic-version" in headers else OPENAI


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


def _is_error(document: dict) -> bool:
    """OpenAI's error object, or Anthropic's error document."""
    return bool(document.get("error") or document.get("type") == "error")


def _text_of(blocks) -> str:
    """The text of Anthropic content blocks."""
    if not isinstance(blocks, list):
        return ""
    return "".join(b["text"] for b in blocks if isinstance(b, dict) and b.get("type", "text") == "text" and isinstance(b.get("text"), str))


def _block_kind(kind) -> dict:
    """EventFacts' flags for an Anthropic content block (or delta) type."""
    if kind in ("tool_use", "server_tool_use", "input_json_delta"):
        return {"tool_call": True}
    if kind in ("thinking", "redacted_thinking", "thinking_delta", "signature_delta"):
        return {"reasoning": True}
    return {}


def _tokens(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _openai_usage(usage: dict) -> Usage:
    return Usage(_tokens(usage.get("prompt_tokens")), _tokens(usage.get("completion_tokens")))


def _anthropic_usage(usage: dict) -> Usage:
    prompt = sum(_tokens(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    return Usage(prompt, _tokens(usage.get("output_tokens")))
