"""Server-sent events between the upstream and the client, with the guarantee SillyTavern needs: every stream ends.

SillyTavern never ends its own reply when the upstream drops a stream after the headers, so the chat hangs until the
user reloads. Here every way a stream can go wrong after the client got its first byte — a drop, a silence longer than
idle_timeout, an end without `[DONE]` or a finish_reason — becomes exactly one `data: {"error": ...}` event, then
`data: [DONE]`, then a clean end of the body.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from seaking.errors import ProxyError
from retry_policy import Classification, Failure, Verdict

HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# A finish marker in an event: OpenAI's non-null finish_reason, Anthropic's message_stop.
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"|"type"\s*:\s*"message_stop"')


def is_event_stream(content_type: str) -> bool:
    return content_type.lower().startswith("text/event-stream")


class SseWatcher:
    """Follows an SSE byte stream without changing it: which events went by, and where the stream stands."""

    def __init__(self) -> None:
        self._partial = b""  # an incomplete line
        self._event_open = False  # data lines seen since the last blank line
        self.events = 0  # complete events that carried data
        self.first_data: bytes | None = None
        self.saw_done = False
        self.saw_finish = False
        self.saw_error = False

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line:
            if self._event_open:
                self.events += 1
                self._event_open = False
            return
        if not line.startswith(b"data:"):
            return  # comments (": keep-alive"), event:, id:, retry:
        self._event_open = True
        payload = line[5:].strip()
        if self.first_data is None:
            self.first_data = payload
        if payload == b"[DONE]":
            self.saw_done = True
        elif _FINISHED.search(payload):
            self.saw_finish = True
        if b'"error"' in payload and is_error_payload(payload):
            self.saw_error = True

    def to_boundary(self) -> bytes:
        """What ends the current line and event, so that an appended event is read as an event of its own."""
        if self._partial:
            return b"\n\n"
        return b"\n" if self._event_open else b""

    def ending(self, problem: ProxyError | None, append_done: bool) -> tuple[bytes, ProxyError | None]:
        """The bytes that close the stream cleanly, given how the upstream's part ended, and what went wrong if
        anything did (None for a complete reply)."""
        if self.saw_done:
            return b"", None
        if problem is None and self.saw_finish:
            return (self.to_boundary() + DONE if append_done else b""), None
        if problem is None:
            problem = ProxyError(
                502,
                "Upstream ended the stream before the reply was complete (no [DONE] and no finish_reason).",
                "stream_incomplete",
            )
        error_event = b"" if self.saw_error else problem.sse_event()  # never a second error after the upstream's own
        return self.to_boundary() + error_event + DONE, problem


def completion_as_sse(body: bytes) -> bytes | None:
    """A non-streaming completion as the SSE stream the client asked for: some upstreams ignore "stream": true."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    choices = document.get("choices") if isinstance(document, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return None
    streamed = []
    for index, choice in enumerate(choices):
        delta = {"delta": choice["message"]} if "message" in choice else {"text": choice.get("text", "")}
        streamed.append({"index": choice.get("index", index), **delta, "finish_reason": choice.get("finish_reason") or "stop"})
    event = {**document, "object": "chat.completion.chunk", "choices": streamed}
    return b"data: " + json.dumps(event).encode() + b"\n\n" + DONE


def is_error_payload(payload: bytes) -> bool:
    try:
        document = json.loads(payload)
    except ValueError:
        return False
    return isinstance(document, dict) and bool(document.get("error") or document.get("type") == "error")


@dataclass
class LiveStream:
    """An upstream SSE response whose first event has arrived and was worth keeping; the rest is still to be read."""

    response: aiohttp.ClientResponse
    watcher: SseWatcher
    prefetched: bytes

    def close(self) -> None:
        self.response.close()  # closes the connection: the upstream stops generating for nobody


async def read_first_event(response: aiohttp.ClientResponse, timeout: float) -> tuple[LiveStream | None, bytes, Classification]:
    """Read until the first complete data event; judge it. A LiveStream comes back only for a good first event."""
    watcher = SseWatcher()
    prefetched = b""
    try:
        async with asyncio.timeout(timeout):
            while watcher.events == 0:
                chunk = await response.content.readany()
                if not chunk:
                    break
                watcher.feed(chunk)
                prefetched += chunk
    except TimeoutError:
        response.close()
        return None, prefetched, Classification(
            Verdict.RETRY, f"no first event from upstream within {timeout:g} s", Failure.TIMEOUT
        )
    except (aiohttp.ClientError, OSError):
        response.close()
        return None, prefetched, Classification(Verdict.RETRY, "upstream broke off the stream before its first event", Failure.NETWORK)
    if watcher.events == 0:
        response.close()
        return None, prefetched, Classification(Verdict.RETRY, "upstream ended the stream before its first event", Failure.BROKEN)
    if is_error_payload(watcher.first_data):
        response.close()
        detail = f"upstream stream began with an error: {watcher.first_data.decode('utf-8', 'replace')[:300]}"
        return None, prefetched, Classification(Verdict.RETRY, detail, Failure.BROKEN)
    return LiveStream(response, watcher, prefetched), prefetched, Classification(Verdict.SUCCESS)


async def client_stream(
    outcome: asyncio.Future,
    heartbeat_interval: float,
    idle_timeout: float,
    append_done: bool,
    on_problem: Callable[[ProxyError], None],
    stop: asyncio.Future | None = None,
) -> AsyncIterator[bytes]:
    """The body the client receives once the proxy has committed to a streaming answer.

    `outcome` resolves to a LiveStream to pipe, a complete SSE body, or the ProxyError to report. Until it does, the client gets an
    SSE comment every heartbeat_interval, so that neither it nor anything between us closes an idle connection.
    `stop` resolves to a ProxyError when the stream must end now (the proxy is shutting down).
    """
    waits_for = {outcome} if stop is None else {outcome, stop}
    while not outcome.done():
        if stop is not None and stop.done():
            on_problem(stop.result())
            yield stop.result().sse_event() + DONE
            return
        yield HEARTBEAT
        await asyncio.wait(waits_for, timeout=heartbeat_interval, return_when=asyncio.FIRST_COMPLETED)
    result = outcome.result()
    if isinstance(result, ProxyError):
        on_problem(result)
        yield result.sse_event() + DONE
        return
    if isinstance(result, bytes):  # a complete body, made from a non-streaming answer
        yield result
        return
    async for chunk in _pipe(result, idle_timeout, append_done, on_problem, stop):
        yield chunk


class IdleWatchdog:
    """Closes the upstream response when a read has waited longer than idle_timeout.

    One timer per stream that re-arms itself, instead of asyncio.timeout around every read: a timer scheduled and
    cancelled per chunk cost about 25 µs a chunk (cancelled timers pile up in the loop's heap). Only time spent
    waiting for the upstream counts: while the client is slow to take a chunk, the upstream is not idle.
    """

    def __init__(self, live: LiveStream, idle_timeout: float) -> None:
        self._live = live
        self._timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._reading_since: float | None = None
        self.fired = False
        self._timer = self._loop.call_later(idle_timeout, self._check)

    def reading(self) -> None:
        self._reading_since = self._loop.time()

    def got_data(self) -> None:
        self._reading_since = None

    def _check(self) -> None:
        waited = 0.0 if self._reading_since is None else self._loop.time() - self._reading_since
        if waited >= self._timeout:
            self.fired = True
            self._live.close()  # the pending read fails at once
        else:
            self._timer = self._loop.call_later(self._timeout - waited, self._check)

    def stop(self) -> None:
        self._timer.cancel()


async def _pipe(
    live: LiveStream,
    idle_timeout: float,
    append_done: bool,
    on_problem: Callable[[ProxyError], None],
    stop: asyncio.Future | None = None,
) -> AsyncIterator[bytes]:
    problem = None
    watchdog = IdleWatchdog(live, idle_timeout)
    content = live.response.content
    stopped_by: ProxyError | None = None

    def stop_now(future: asyncio.Future) -> None:
        nonlocal stopped_by
        stopped_by = future.result()
        live.close()  # the pending read fails at once

    if stop is not None:
        stop.add_done_callback(stop_now)
    try:
        if live.prefetched:
            yield live.prefetched
        while True:
            try:
                watchdog.reading()
                chunk = await content.readany()
                watchdog.got_data()
            except (aiohttp.ClientError, OSError):
                if not watchdog.fired and stopped_by is None:
                    problem = ProxyError(
                        502, "Upstream connection dropped in the middle of the stream; the reply is incomplete.",
                        "stream_interrupted",
                    )
                    last_words = _received_before_the_drop(content)
                    if last_words:
                        live.watcher.feed(last_words)
                        yield last_words
                break
            if not chunk:
                break
            live.watcher.feed(chunk)
            yield chunk
        if watchdog.fired:
            problem = ProxyError(
                504, f"Upstream sent nothing for {idle_timeout:g} s in the middle of the stream; the reply is incomplete.",
                "stream_idle_timeout",
            )
        if stopped_by is not None:
            problem = stopped_by
        tail, problem = live.watcher.ending(problem, append_done)
        if problem is not None:
            on_problem(problem)
        if tail:
            yield tail
    finally:
        watchdog.stop()
        if stop is not None:
            stop.remove_done_callback(stop_now)
        live.close()


def _received_before_the_drop(content: aiohttp.StreamReader) -> bytes:
    """Bytes aiohttp had already received when the connection broke.

    StreamReader.readany raises the connection's error before it hands out what is still buffered, so under load the
    last chunks before a drop would be lost although they arrived; they belong to the client. (Private attributes,
    hence the getattr: on an aiohttp without them we lose those bytes, as plain aiohttp would.)
    """
    buffered = getattr(content, "_buffer", None)
    read_nowait = getattr(content, "_read_nowait", None)
    return read_nowait(-1) if buffered and read_nowait else b""
