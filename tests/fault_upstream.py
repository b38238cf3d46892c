"""A real OpenAI-compatible server on 127.0.0.1 that misbehaves on request.

Each endpoint answers from a script of faults, one per request, then falls back to its default (a good answer unless
`always` says otherwise):

    upstream.script("chat/completions", Status(503), Status(503))   # two 503s, then a good completion
    upstream.always("models", Reset())                               # /models never answers

Run it alone for manual tests and benchmarks: `python tests/fault_upstream.py --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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
        if path.endswith("/models"):
            return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in MODEL_IDS]})
        if path.endswith("/embeddings"):
            return web.json_response({"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}]})
        if path.endswith("/completions") or path.endswith("/messages"):
            document = _json_or_empty(received.body)
            if document.get("stream"):
                return await Stream(chunks=_split(self.text))(request, received)
            return web.json_response(completion(self.text, document.get("model", "model-a")))
        return web.json_response({"path": received.path, "method": received.method})


@dataclass
class Status:
    code: int
    body: object = None  # dict -> JSON, str/bytes -> as is, None -> an OpenAI error for the code
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    async def __call__(self, request, received) -> web.StreamResponse:
        body = self.body
        if body is None:
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

    seconds: float = 3600

    async def __call__(self, request, received) -> web.StreamResponse:
        await asyncio.sleep(self.seconds)
        return await Good()(request, received)


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
        return web.json_response({"error": {"message": self.message, "type": "server_error"}})


@dataclass
class Stream:
    """An SSE chat completion: chunks with a delay between them, with optional faults."""

    chunks: list[str] = field(default_factory=lambda: _split(REPLY_TEXT))
    delay: float = 0.0
    drop_after: int | None = None  # close the connection after this many chunks
    stall_after: int | None = None  # go silent (forever) after this many chunks
    no_done: bool = False  # end without "data: [DONE]"
    finish_reason: str | None = "stop"  # None: the last chunk carries no finish_reason
    error_first: str | None = None  # the first event is this error message, then the stream ends

    async def __call__(self, request, received) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        if self.error_first is not None:
            await response.write(sse({"error": {"message": self.error_first, "type": "server_error"}}))
            await response.write_eof()
            return response
        model = _json_or_empty(received.body).get("model", "model-a")
        for index, text in enumerate(self.chunks):
            if index == self.drop_after:
                request.transport.close()
                raise asyncio.CancelledError
            if index == self.stall_after:
                await asyncio.sleep(3600)
            if index and self.delay:
                await asyncio.sleep(self.delay)
            await response.write(sse(chunk(text, model, index)))
        if self.finish_reason is not None:
            await response.write(sse(chunk("", model, len(self.chunks), finish_reason=self.finish_reason)))
        if not self.no_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class Delayed:
    """Wait, then answer as `then` does."""

    seconds: float
    then: object = field(default_factory=Good)

    async def __call__(self, request, received) -> web.StreamResponse:
        await asyncio.sleep(self.seconds)
        return await self.then(request, received)


@dataclass
class Sometimes:
    """Answer as `fault` with probability `chance`, else normally: a flaky upstream for load tests."""

    chance: float
    fault: object
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    async def __call__(self, request, received) -> web.StreamResponse:
        chosen = self.fault if self.rng.random() < self.chance else Good()
        return await chosen(request, received)


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


def sse(document: dict) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _split(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _json_or_empty(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


# --- the server --------------------------------------------------------------------------------------------------


class FaultyUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._scripts: dict[str, deque] = {}
        self._always: dict[str, object] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def script(self, endpoint: str, *faults) -> None:
        """The next requests to `endpoint` (e.g. "chat/completions", "models") get these answers in order."""
        self._scripts.setdefault(endpoint, deque()).extend(faults)

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
        self.received.append(received)
        try:
            return await self._fault_for(request.path)(request, received)
        except (asyncio.CancelledError, ConnectionResetError):
            received.disconnected_at = time.monotonic()
            raise

    def _fault_for(self, path: str):
        # Longest endpoint first: "chat/completions" must not be taken for "completions".
        for endpoint in sorted(set(self._scripts) | set(self._always), key=len, reverse=True):
            if path.rstrip("/").endswith("/" + endpoint):
                queue = self._scripts.get(endpoint)
                if queue:
                    return queue.popleft()
                if endpoint in self._always:
                    return self._always[endpoint]
        return Good()


async def _serve(port: int) -> None:
    upstream = FaultyUpstream()
    print(f"fault upstream listening at {await upstream.start(port)}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(_serve(parser.parse_args().port))
    except KeyboardInterrupt:
        pass
