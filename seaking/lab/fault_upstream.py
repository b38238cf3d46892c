"""A real OpenAI-compatible server on 127.0.0.1 that misbehaves on request; on /v1/messages it is an Anthropic one.

Each endpoint answers from a script of faults, one per request, then falls back to its default (a good answer unless
`always` says otherwise):

    upstream.script("chat/completions", Status(503), Status(503))   # two 503s, then a good completion
    upstream.always("models", Reset())                               # /models never answers
    upstream.script("messages", Status(529), MessageStream(drop_after=2))   # Anthropic: overloaded, then a broken stream

Continuing: a stream's reply is its chunks; a request whose last message is the assistant's and ends with a start of
that reply (a continuation: seaking-proxy's resume) gets the rest of it, split at words, as a stream of its own. Every
streaming fault applies to the continuation's chunks as well; `restate=N` begins it with the last N words of the start.

Anthropic mode: on a Messages path (`/messages`, `/messages/count_tokens`) the good answers, the default error bodies
(`Status`, `ErrorBody`) and streams (`MessageStream`) have Anthropic's shapes; so has `/models` when the request
carries `anthropic-version`.

Run it alone for manual tests, from the project's root: `python -m seaking.lab.fault_upstream --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

MODEL_IDS = ("model-a", "model-b")
REPLY_TEXT = "Hello from upstream"


@dataclass
class Received:
    method: str
    path: str  # with query
    headers: dict[str, str]
    body: bytes
    disconnected_at: float | None = None  # time.monotonic() when the client went away mid-answer
    answered_at: float | None = None  # time.monotonic() when the whole answer was written
    arrived: float = field(default_factory=time.monotonic)

    def json(self):
        return json.loads(self.body)


# --- faults: each is an awaitable answer to one request ----------------------------------------------------------


@dataclass
class Good:
    """The endpoint's normal answer (a completion, the model list, an SSE stream when asked for)."""

    text: str = REPLY_TEXT

    async def __call__(self, request: web.Request, received: Received) -> web.StreamResponse:
        path = request.path
        document = _json_or_empty(received.body)
        model = document.get("model", "model-a")
        if path.endswith("/models"):
            if "anthropic-version" in request.headers:
                return web.json_response(anthropic_models())
            return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in MODEL_IDS]})
        if path.endswith("/embeddings"):
            return web.json_response({"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}]})
        if path.endswith("/messages/count_tokens"):
            return web.json_response({"input_tokens": len(received.body) // 4})
        if path.endswith("/messages"):
            if document.get("stream"):
                return await MessageStream(chunks=split_words(self.text))(request, received)
            return web.json_response(message(self.text, model))
        if path.endswith("/completions"):
            if document.get("stream"):
                return await Stream(chunks=split_words(self.text))(request, received)
            return web.json_response(completion(self.text, model))
        return web.json_response({"path": received.path, "method": received.method})


@dataclass
class Status:
    code: int
    body: object = None  # dict -> JSON, str/bytes -> as is, None -> an OpenAI (Anthropic) error for the code
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    async def __call__(self, request, received) -> web.StreamResponse:
        body = self.body
        if body is None and is_messages(request.path):
            body = anthropic_error(self.code, f"upstream status {self.code}")
        elif body is None:
            body = {"error": {"message": f"upstream status {self.code}", "type": "upstream_test", "code": self.code}}
        if isinstance(body, dict):
            return web.json_response(body, status=self.code, headers=self.headers, reason=self.reason)
        data = body.encode() if isinstance(body, str) else body
        return web.Response(body=data, status=self.code, headers=self.headers, reason=self.reason,
                            content_type="text/plain")


@dataclass
class Reset:
    """Accept the request, then close the connection without a response ('socket hang up')."""

    async def __call__(self, request, received) -> web.StreamResponse:
        request.transport.close()
        raise asyncio.CancelledError  # nothing may be written after this


@dataclass
class Hang:
    """Never answer (until the server stops)."""

    async def __call__(self, request, received) -> web.StreamResponse:
        return await asyncio.get_running_loop().create_future()  # never set: cancelled when the server stops


@dataclass
class CutOff:
    """A non-streaming answer cut off: the headers and half the completion it announced, then the connection closes."""

    async def __call__(self, request, received) -> web.StreamResponse:
        body = json.dumps(completion(REPLY_TEXT, "model-a")).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        request.transport.close()
        raise asyncio.CancelledError  # nothing more may be written


@dataclass
class Empty:
    async def __call__(self, request, received) -> web.StreamResponse:
        return web.Response(body=b"", content_type="application/json")


@dataclass
class Malformed:
    async def __call__(self, request, received) -> web.StreamResponse:
        return web.Response(body=b'{"choices": [ {"mess', content_type="application/json")


@dataclass
class ErrorBody:
    """A 200 whose JSON body is an error object, as some aggregators send."""

    message: str = "provider overloaded"

    async def __call__(self, request, received) -> web.StreamResponse:
        if is_messages(request.path):
            return web.json_response(anthropic_error(529, self.message))
        return web.json_response({"error": {"message": self.message, "type": "server_error"}})


@dataclass
class Stream:
    """An SSE chat completion: chunks with a delay between them, with optional faults."""

    chunks: list[str] = field(default_factory=lambda: split_words(REPLY_TEXT))
    delay: float = 0.0
    drop_after: int | None = None  # close the connection after this many chunks
    stall_after: int | None = None  # go silent (forever) after this many chunks
    no_done: bool = False  # end without "data: [DONE]"
    finish_reason: str | None = "stop"  # None: the last chunk carries no finish_reason
    error_first: str | None = None  # the first event is this error message, then the stream ends
    restate: int = 0  # a continuation begins with the last words of its start
    tool_call: bool = False  # the chunks are a tool call's arguments, not text
    usage: bool = False  # a last chunk with usage (as with stream_options.include_usage)
    first_event_after: float = 0.0  # seconds between the response headers and the first event
    headers: dict[str, str] = field(default_factory=dict)  # more response headers

    async def __call__(self, request, received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", **self.headers})
        await response.prepare(request)
        if self.error_first is not None:
            await response.write(sse({"error": {"message": self.error_first, "type": "server_error"}}))
            await response.write_eof()
            return response
        model = _json_or_empty(received.body).get("model", "model-a")
        chunks = continued(self.chunks, received, self.restate)
        await asyncio.sleep(self.first_event_after)
        for index, text in enumerate(chunks):
            await _before_chunk(self, index, request)
            await response.write(sse(tool_call_chunk(text, model, index) if self.tool_call else chunk(text, model, index)))
        if self.finish_reason is not None:
            await response.write(sse(chunk("", model, len(chunks), finish_reason=self.finish_reason)))
        if self.usage:
            usage = {"prompt_tokens": 5, "completion_tokens": len(chunks), "total_tokens": 5 + len(chunks)}
            await response.write(sse({**chunk("", model, 1), "choices": [], "usage": usage}))
        if not self.no_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class MessageStream:
    """An Anthropic Messages stream: named events in Anthropic's order (a ping after the first content_block_start, as
    its API sends), one text_delta per chunk, with optional faults."""

    chunks: list[str] = field(default_factory=lambda: split_words(REPLY_TEXT))
    delay: float = 0.0
    drop_after: int | None = None  # close the connection after this many text deltas
    stall_after: int | None = None  # go silent (forever) after this many text deltas
    no_stop: bool = False  # end without message_stop
    drop_at_stop: bool = False  # close the connection where message_stop would come (lost in the last milliseconds)
    stop_reason: str | None = "end_turn"  # message_delta's; None: no message_delta
    error_first: str | None = None  # after message_start (no content yet): an `event: error` with this message, the end
    error_after: int | None = None  # after this many text deltas: an `event: error` (overloaded_error), then the end
    think: float = 0.0  # seconds between the preamble and the first text delta (a long prompt being read)
    ping_every: float | None = None  # while thinking, a ping this often (None: silence)
    restate: int = 0  # a continuation begins with the last words of its start
    tool_use: bool = False  # the chunks are a tool_use block's input JSON, not text

    async def __call__(self, request, received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", "request-id": "req_test"})
        await response.prepare(request)
        model = _json_or_empty(received.body).get("model", "model-a")
        start = {**message("", model), "content": [], "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}
        await response.write(named("message_start", {"type": "message_start", "message": start}))
        if self.error_first is not None:
            await response.write(named("error", anthropic_error(529, self.error_first)))
            await response.write_eof()
            return response
        chunks = continued(self.chunks, received, self.restate)
        block = {"type": "tool_use", "id": "toolu_test", "name": "lookup", "input": {}} if self.tool_use else {"type": "text", "text": ""}
        await response.write(named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}))
        await response.write(named("ping", {"type": "ping"}))
        thought = 0.0
        while thought < self.think:
            step = min(self.ping_every or self.think, self.think - thought)
            await asyncio.sleep(step)
            thought += step
            if self.ping_every:
                await response.write(named("ping", {"type": "ping"}))
        for index, text in enumerate(chunks):
            if index == self.error_after:
                await response.write(named("error", anthropic_error(529, "Overloaded")))
                await response.write_eof()
                return response
            await _before_chunk(self, index, request)
            piece = {"type": "input_json_delta", "partial_json": text} if self.tool_use else {"type": "text_delta", "text": text}
            await response.write(named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": piece}))
        await response.write(named("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if self.stop_reason is not None:
            delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
            await response.write(named("message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": len(chunks)}}))
        if self.drop_at_stop:
            request.transport.close()
            raise asyncio.CancelledError  # nothing may be written after this
        if not self.no_stop:
            await response.write(named("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response


async def _before_chunk(stream: Stream | MessageStream, index: int, request: web.Request) -> None:
    """A stream's faults before its chunk `index`: a drop, a stall, or its pace."""
    if index == stream.drop_after:
        request.transport.close()
        raise asyncio.CancelledError  # nothing may be written after this
    if index == stream.stall_after:
        await asyncio.sleep(3600)
    if index and stream.delay:
        await asyncio.sleep(stream.delay)


@dataclass
class Blank:
    """A well-formed reply with no content at all, in the endpoint's shape: a completion whose content is "", a
    message with no content blocks; asked for a stream, a stream of only its preamble and its end."""

    async def __call__(self, request, received) -> web.StreamResponse:
        document = _json_or_empty(received.body)
        model = document.get("model", "model-a")
        if is_messages(request.path):
            if document.get("stream"):
                return await MessageStream(chunks=[])(request, received)
            return web.json_response({**message("", model), "content": [], "usage": {"input_tokens": 5, "output_tokens": 0}})
        if document.get("stream"):
            return await Stream(chunks=[])(request, received)
        blank = completion("", model)
        blank["usage"] = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
        return web.json_response(blank)


@dataclass
class PrefillRefused:
    """The 400 of a model that takes no assistant prefill (Claude 4.6 and later), in the endpoint's shape."""

    async def __call__(self, request, received) -> web.StreamResponse:
        return await Status(400, body=_prefill_refusal(request.path))(request, received)


@dataclass
class Delayed:
    """Wait, then answer as `then` does."""

    seconds: float
    then: object = field(default_factory=Good)

    async def __call__(self, request, received) -> web.StreamResponse:
        await asyncio.sleep(self.seconds)
        return await self.then(request, received)


# --- OpenAI shapes -----------------------------------------------------------------------------------------------


def completion(text: str, model: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }


def chunk(text: str, model: str, index: int, finish_reason: str | None = None) -> dict:
    delta = {"content": text} if text else {}
    if index == 0:
        delta["role"] = "assistant"
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def tool_call_chunk(arguments: str, model: str, index: int) -> dict:
    call = {"index": 0, "function": {"arguments": arguments}}
    if index == 0:
        call.update(id="call_test", type="function", function={"name": "lookup", "arguments": arguments})
    return {**chunk("", model, index), "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}


def sse(document: dict) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


# --- Anthropic shapes --------------------------------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 504: "timeout_error", 529: "overloaded_error",
}


def is_messages(path: str) -> bool:
    return path.rstrip("/").endswith(("/messages", "/messages/count_tokens"))


def message(text: str, model: str) -> dict:
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 3},
    }


def anthropic_error(status: int, text: str) -> dict:
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": text}}


def anthropic_models() -> dict:
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in MODEL_IDS]
    return {"data": data, "has_more": False, "first_id": MODEL_IDS[0], "last_id": MODEL_IDS[-1]}


def named(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"


def split_words(text: str) -> list[str]:
    """Word by word, each word with the whitespace before it: 'Hello from' -> ['Hello', ' from']."""
    return re.findall(r"\s*\S+|\s+$", text)


def continued(chunks: list[str], received: Received, restate: int = 0) -> list[str]:
    """The chunks a request gets: all of them; or for a continuation — its last message the assistant's, ending with a
    start of the reply — the rest of the reply after that start, its last `restate` words first."""
    start = assistant_start(received)
    reply = "".join(chunks)
    if start is None:
        return chunks
    for length in range(len(reply), 0, -1):
        if start.endswith(reply[:length]):
            restated = " ".join(reply[:length].split()[-restate:]) if restate else ""
            return split_words(restated + reply[length:])
    return chunks


def _case_of(received: Received) -> str | None:
    """The case a request's first message names (`CASE: <case>`): which of many scripts it follows."""
    messages = _json_or_empty(received.body).get("messages")
    first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
    content = first.get("content")
    match = re.search(r"CASE: (\S+)", content) if isinstance(content, str) else None
    return match.group(1) if match else None


def assistant_start(received: Received) -> str | None:
    """The reply's start a continuation request carries: its trailing assistant message's text (None: not one)."""
    messages = _json_or_empty(received.body).get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _prefill_refusal(path: str) -> dict:
    message = "This model does not support assistant message prefill. The conversation must end with a user message."
    if is_messages(path):
        return anthropic_error(400, message)
    return {"error": {"message": message, "type": "invalid_request_error", "code": "prefill_unsupported"}}


def _json_or_empty(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


# --- the server --------------------------------------------------------------------------------------------------


class FaultyUpstream:
    def __init__(self, keep_received: bool = True) -> None:
        self.keep_received = keep_received  # every request in `received`, for tests to read
        self.received: list[Received] = []
        self._scripts: dict[str, deque] = {}
        self._always: dict[str, object] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def script(self, endpoint: str, *faults, case: str | None = None) -> None:
        """The next requests to `endpoint` (e.g. "chat/completions", "models") get these answers in order. With
        `case`, only requests whose first message says that case (`CASE: <case>` in its content) do: many clients at
        once, each request with a script of its own, its retries and continuations included."""
        self._scripts.setdefault(endpoint if case is None else f"{endpoint}#{case}", deque()).extend(faults)

    def always(self, endpoint: str, fault) -> None:
        """Once its script is used up, `endpoint` answers with `fault` (None: the good answer again)."""
        if fault is None:
            self._always.pop(endpoint, None)
        else:
            self._always[endpoint] = fault

    def received_at(self, endpoint: str) -> list[Received]:
        return [r for r in self.received if r.path.split("?")[0].endswith("/" + endpoint)]

    async def start(self, port: int = 0, ssl_context=None) -> str:
        """Listen on 127.0.0.1 (with `ssl_context`, over TLS: an https:// upstream)."""
        self.scheme = "https" if ssl_context else "http"
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that leaves is noticed at once, as a real server's socket would be.
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(request.method, request.path_qs, dict(request.headers), await request.read())
        if self.keep_received:
            self.received.append(received)
        try:
            answer = await self._fault_for(request.path, _case_of(received))(request, received)
        except (asyncio.CancelledError, ConnectionResetError):
            received.disconnected_at = time.monotonic()
            raise
        received.answered_at = time.monotonic()
        return answer

    @property
    def open_requests(self) -> list[Received]:
        """Requests still being answered: their client has neither had the whole answer nor gone away."""
        return [r for r in self.received if r.answered_at is None and r.disconnected_at is None]

    def _fault_for(self, path: str, case: str | None):
        # Longest endpoint first: "chat/completions" must not be taken for "completions".
        endpoints = {key.partition("#")[0] for key in self._scripts} | set(self._always)
        for endpoint in sorted(endpoints, key=len, reverse=True):
            if path.rstrip("/").endswith("/" + endpoint):
                queue = self._scripts.get(f"{endpoint}#{case}") or self._scripts.get(endpoint)
                if queue:
                    return queue.popleft()
                if endpoint in self._always:
                    return self._always[endpoint]
        return Good()


def serve_until_stopped(upstream: FaultyUpstream, port: int, label: str) -> None:
    """Run `upstream` on 127.0.0.1:`port` until SIGINT, first saying "<label> listening at 127.0.0.1:N" (the line
    the lab's harness and the benchmarks wait for)."""

    async def serve() -> None:
        url = await upstream.start(port)
        print(f"{label} listening at {url.split('://', 1)[1]}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await upstream.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    serve_until_stopped(FaultyUpstream(), parser.parse_args().port, "fault upstream")
