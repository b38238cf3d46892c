"""Server-sent events between the upstream and the client, with the guarantee SillyTavern needs: every stream ends.

SillyTavern never ends its own reply when the upstream drops a stream after the headers, so the chat hangs until the
user reloads. Here every way a stream can go wrong after the client got its first byte — a drop, a silence longer than
idle_timeout, an end without `[DONE]` or a finish_reason (Anthropic: without `message_stop`) — becomes exactly one
error event in the request's API dialect (OpenAI: `data: {"error": ...}`, then `data: [DONE]`; Anthropic:
`event: error` and nothing after it), then a clean end of the body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from retry_policy import Classification, Failure, Verdict
from seaking.dialects import Dialect, EventFacts
from seaking.errors import ProxyError


# What is kept of a relayed stream for its attempt flow (attempt_flows.py), when one is made.
RECEIVED_LIMIT = 1024 * 1024


def is_event_stream(content_type: str) -> bool:
    return content_type.lower().startswith("text/event-stream")


@dataclass
class Reply:
    """What a stream's events have said so far about the reply in them."""

    pieces: list[str] = field(default_factory=list)  # the reply text, as it came
    deltas: int = 0  # events that carried content
    tool_calls: bool = False
    reasoning: bool = False
    other_choices: bool = False
    prompt_tokens: int | None = None  # as reported by the upstream
    completion_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def chars(self) -> int:
        return sum(map(len, self.pieces))

    def add(self, facts: EventFacts) -> None:
        if facts.text:
            self.pieces.append(facts.text)
        if facts.content:
            self.deltas += 1
        self.tool_calls |= facts.tool_call
        self.reasoning |= facts.reasoning
        self.other_choices |= facts.other_choice
        if facts.usage is not None:
            if facts.usage.prompt:
                self.prompt_tokens = facts.usage.prompt
            if facts.usage.completion:
                self.completion_tokens = facts.usage.completion  # cumulative: the last report counts


class SseWatcher:
    """Follows an SSE byte stream without changing it: which events went by, what the reply says so far, and where
    the stream stands."""

    def __init__(self, api: Dialect) -> None:
        self.api = api
        self._partial = b""  # an incomplete line
        self._event_open = False  # data lines seen since the last blank line
        self.data_lines = 0
        self.reply = Reply()
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
        facts = self.api.read_event(payload)
        self.reply.add(facts)
        self.saw_done |= facts.end
        self.saw_finish |= facts.finish
        self.saw_error |= facts.error
        if not self.content_started:
            if facts.error:
                self.error_first = self.error_first or payload
            elif facts.content or facts.end:
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


class UpstreamStream:
    """An upstream SSE response whose first content has arrived: the rest is still to be read. It owns the open
    connection until `close()`, which is idempotent: closing it stops the upstream generating for nobody.

    It is made by `read_first_event` and handed, with the attempt that opened it, to whoever relays it; the stream
    answer (stream_answer.py) closes it when the client's stream is over, whatever ended it."""

    def __init__(self, response: aiohttp.ClientResponse, watcher: SseWatcher, prefetched: bytes) -> None:
        self.response = response
        self.watcher = watcher
        self.prefetched = prefetched  # read while judging the first event: not yet sent to anyone
        self.received: bytearray | None = None  # when set, what is read after `prefetched` is kept here (attempt flows)

    @property
    def content(self) -> aiohttp.StreamReader:
        return self.response.content

    def keep(self, chunk: bytes) -> None:
        if self.received is not None and len(self.received) < RECEIVED_LIMIT:
            self.received += chunk[: RECEIVED_LIMIT - len(self.received)]

    def close(self) -> None:
        self.response.close()


async def read_first_event(
    response: aiohttp.ClientResponse, silence: float, deadline_at: float, api: Dialect
) -> tuple[UpstreamStream | None, bytes, Classification]:
    """Read until the first event with content, or an error before it; judge it. An UpstreamStream comes back only
    when content came first: until then nothing need reach the client, so whatever goes wrong can still be retried.
    Otherwise the response is closed here.

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
        window = max(0.0, window)
        detail = (
            f"no first event from upstream within {window:g} s" if watcher.data_lines == 0
            else f"upstream went silent for {window:g} s before any content"
        )
        classification = Classification(Verdict.RETRY, detail, Failure.TIMEOUT)
    except (aiohttp.ClientError, OSError):
        classification = Classification(Verdict.RETRY, "upstream broke off the stream before its first event", Failure.NETWORK)
    except BaseException:  # cancelled: the client left, or the proxy is stopping
        response.close()
        raise
    else:
        if watcher.error_first is not None:
            detail = f"upstream stream began with an error: {watcher.error_first.decode('utf-8', 'replace')[:300]}"
            classification = Classification(Verdict.RETRY, detail, Failure.BROKEN)
        elif not watcher.content_started:
            classification = Classification(Verdict.RETRY, "upstream ended the stream before its first event", Failure.BROKEN)
        else:
            return UpstreamStream(response, watcher, prefetched), prefetched, Classification(Verdict.SUCCESS)
    response.close()
    return None, prefetched, classification


class IdleWatchdog:
    """Closes the upstream response when a read has waited longer than idle_timeout.

    One timer per stream that re-arms itself, instead of asyncio.timeout around every read: a timer scheduled and
    cancelled per chunk cost about 25 µs a chunk (cancelled timers pile up in the loop's heap). Only time spent
    waiting for the upstream counts: while the client is slow to take a chunk, the upstream is not idle.
    """

    def __init__(self, live: UpstreamStream, idle_timeout: float) -> None:
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


async def pipe(
    live: UpstreamStream,
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


def _received_before_the_drop(content: aiohttp.StreamReader) -> bytes:
    """Bytes aiohttp had already received when the connection broke.

    StreamReader.readany raises the connection's error before it hands out what is still buffered, so under load the
    last chunks before a drop would be lost although they arrived; they belong to the client. (Private attributes,
    hence the getattr: on an aiohttp without them we lose those bytes, as plain aiohttp would.)
    """
    buffered = getattr(content, "_buffer", None)
    read_nowait = getattr(content, "_read_nowait", None)
    return read_nowait(-1) if buffered and read_nowait else b""
