"""Server-sent events between the upstream and the client, with the guarantee SillyTavern needs: every stream ends.

SillyTavern never ends its own reply when the upstream drops a stream after the headers, so the chat hangs until the
user reloads. Here every way a stream can go wrong after the client got its first byte — a drop, a silence longer than
idle_timeout, an end without `[DONE]` or a finish_reason (Anthropic: without `message_stop`) — becomes exactly one
error event in the request's API dialect (OpenAI: `data: {"error": ...}`, then `data: [DONE]`; Anthropic:
`event: error` and nothing after it), then a clean end of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from retry_policy import Classification, Failure, Verdict
from seaking.dialects import Dialect
from seaking.errors import ProxyError


def is_event_stream(content_type: str) -> bool:
    return content_type.lower().startswith("text/event-stream")


class SseWatcher:
    """Follows an SSE byte stream without changing it: which events went by, and where the stream stands."""

    def __init__(self, api: Dialect) -> None:
        self.api = api
        self._partial = b""  # an incomplete line
        self._event_open = False  # data lines seen since the last blank line
        self.data_lines = 0
        self.content_started = False  # data that is content went by (not an error, not a preamble event)
        self.error_first: bytes | None = None  # the data of an error event that came before any content
        self.saw_done = False  # the stream's own last event: [DONE], message_stop
        self.saw_finish = False
        self.saw_error = False

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line:
            self._event_open = False
            return
        if not line.startswith(b"data:"):
            return  # comments (": keep-alive"), event:, id:, retry:
        self._event_open = True
        self.data_lines += 1
        payload = line[5:].strip()
        if self.api.is_end(payload):
            self.saw_done = True
        elif self.api.is_finish(payload):
            self.saw_finish = True
        error = b'"error"' in payload and is_error_payload(payload)
        self.saw_error |= error
        if not self.content_started:
            if error:
                self.error_first = self.error_first or payload
            elif not self.api.is_preamble(payload):
                self.content_started = True

    def to_boundary(self) -> bytes:
        """What ends the current line and event, so that an appended event is read as an event of its own."""
        if self._partial:
            return b"\n\n"
        return b"\n" if self._event_open else b""

    def ending(self, problem: ProxyError | None) -> tuple[bytes, ProxyError | None]:
        """The bytes that close the stream cleanly, given how the upstream's part ended, and what went wrong if
        anything did (None for a complete reply)."""
        api = self.api
        if self.saw_done:
            return b"", None
        if problem is None and self.saw_finish:
            return self.to_boundary() + api.end_of_stream, None  # only OpenAI's finish comes before its end
        if problem is None:
            problem = ProxyError(
                502, f"Upstream ended the stream before the reply was complete ({api.complete_ending}).", "stream_incomplete"
            )
        error_event = b"" if self.saw_error else api.error_event(problem)  # never a second error after the upstream's own
        return self.to_boundary() + error_event + api.end_of_stream, problem


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
    received: bytearray | None = None  # when set, what is read after `prefetched` is kept here too (attempt flows)

    def close(self) -> None:
        self.response.close()  # closes the connection: the upstream stops generating for nobody

    def keep(self, chunk: bytes) -> None:
        if self.received is not None:
            self.received += chunk


async def read_first_event(
    response: aiohttp.ClientResponse, silence: float, deadline_at: float, api: Dialect
) -> tuple[LiveStream | None, bytes, Classification]:
    """Read until the first event with content, or an error before it; judge it. A LiveStream comes back only when
    content came first: until then nothing need reach the client, so whatever goes wrong can still be retried.

    The upstream may take `silence` seconds for its first event, and as long again after each event without content
    (Anthropic's message_start and pings: it is alive, reading a long prompt), but never past `deadline_at`
    (time.monotonic()). An OpenAI stream has no such events: `silence` bounds the wait for its first event."""
    watcher = SseWatcher(api)
    prefetched = b""
    window_start = time.monotonic()
    window = min(silence, deadline_at - window_start)
    try:
        while not (watcher.content_started or watcher.error_first):
            async with asyncio.timeout(max(0.0, window_start + window - time.monotonic())):
                chunk = await response.content.readany()
            if not chunk:
                break
            signs_of_life = watcher.data_lines
            watcher.feed(chunk)
            prefetched += chunk
            if watcher.data_lines > signs_of_life:
                window_start = time.monotonic()
                window = min(silence, deadline_at - window_start)
    except TimeoutError:
        response.close()
        window = max(0.0, window)
        detail = (
            f"no first event from upstream within {window:g} s" if watcher.data_lines == 0
            else f"upstream went silent for {window:g} s before any content"
        )
        return None, prefetched, Classification(Verdict.RETRY, detail, Failure.TIMEOUT)
    except (aiohttp.ClientError, OSError):
        response.close()
        return None, prefetched, Classification(Verdict.RETRY, "upstream broke off the stream before its first event", Failure.NETWORK)
    if watcher.error_first is not None:
        response.close()
        detail = f"upstream stream began with an error: {watcher.error_first.decode('utf-8', 'replace')[:300]}"
        return None, prefetched, Classification(Verdict.RETRY, detail, Failure.BROKEN)
    if not watcher.content_started:
        response.close()
        return None, prefetched, Classification(Verdict.RETRY, "upstream ended the stream before its first event", Failure.BROKEN)
    return LiveStream(response, watcher, prefetched), prefetched, Classification(Verdict.SUCCESS)


async def client_stream(
    outcome: asyncio.Future,
    heartbeat_interval: float,
    idle_timeout: float,
    api: Dialect,
    on_problem: Callable[[ProxyError], None],
    stop: asyncio.Future | None = None,
) -> AsyncIterator[bytes]:
    """The body the client receives once the proxy has committed to a streaming answer.

    `outcome` resolves to a LiveStream to pipe, a complete SSE body, or the ProxyError to report. Until it does, the
    client gets a heartbeat every heartbeat_interval, so that neither it nor anything between us closes an idle
    connection. `stop` resolves to a ProxyError when the stream must end now (the proxy is shutting down).
    """
    waits_for = {outcome} if stop is None else {outcome, stop}
    while not outcome.done():
        if stop is not None and stop.done():
            on_problem(stop.result())
            yield api.error_event(stop.result()) + api.end_of_stream
            return
        yield api.heartbeat
        await asyncio.wait(waits_for, timeout=heartbeat_interval, return_when=asyncio.FIRST_COMPLETED)
    result = outcome.result()
    if isinstance(result, ProxyError):
        on_problem(result)
        yield api.error_event(result) + api.end_of_stream
        return
    if isinstance(result, bytes):  # a complete body, made from a non-streaming answer
        yield result
        return
    async for chunk in _pipe(result, idle_timeout, on_problem, stop):
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
                        live.keep(last_words)
                        yield last_words
                break
            if not chunk:
                break
            live.watcher.feed(chunk)
            live.keep(chunk)
            yield chunk
        if watchdog.fired:
            problem = ProxyError(
                504, f"Upstream sent nothing for {idle_timeout:g} s in the middle of the stream; the reply is incomplete.",
                "stream_idle_timeout",
            )
        if stopped_by is not None:
            problem = stopped_by
        tail, problem = live.watcher.ending(problem)
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
