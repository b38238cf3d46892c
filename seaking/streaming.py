"""Server-sent events between the upstream and the client, with the guarantee SillyTavern needs: every stream ends.

SillyTavern never ends its own reply when the upstream drops a stream after the headers, so the chat hangs until the
user reloads. Here an upstream stream is read event by event (sse.py): judged at its first content, then piped with an
idle timeout. Every way it can go wrong after the client got its first byte — a drop, a silence longer than
idle_timeout, an end without `[DONE]` or a finish_reason (Anthropic: without `message_stop` or a stop_reason) — is known when the pipe
ends, so that the stream answer (stream_answer.py) can continue the reply (resume.py) or end the client's stream with
exactly one error event in the request's API dialect (OpenAI: `data: {"error": ...}`, then `data: [DONE]`; Anthropic:
`event: error` and nothing after it), then a clean end of the body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from retry_policy import Classification, Failure, Verdict
from seaking.dialects import NO_FACTS, Dialect, EventFacts
from seaking.errors import ProxyError
from seaking.sse import SseEvent, SseFramer

# What is kept of a relayed stream for its attempt flow (attempt_flows.py), when one is made.
RECEIVED_LIMIT = 1024 * 1024


def is_event_stream(content_type: str) -> bool:
    return content_type.lower().startswith("text/event-stream")


# The breaks after content a reply is continued after (stream_answer.py), in words (flow_notes.py). Not the
# shutdown's: the proxy is stopping.
CONTINUED_AFTER = {
    "stream_interrupted": "a drop",
    "stream_idle_timeout": "a stall",
    "stream_incomplete": "an early end",
    "stream_upstream_error": "an upstream error",
}


def stream_interrupted() -> ProxyError:
    return ProxyError(
        502, "Upstream connection dropped in the middle of the stream; the reply is incomplete.", "stream_interrupted"
    )


def stream_idle(idle_timeout: float) -> ProxyError:
    return ProxyError(
        504, f"Upstream sent nothing for {idle_timeout:g} s in the middle of the stream; the reply is incomplete.",
        "stream_idle_timeout",
    )


def stream_incomplete(api: Dialect) -> ProxyError:
    return ProxyError(
        502, f"Upstream ended the stream before the reply was complete ({api.complete_ending}).", "stream_incomplete"
    )


@dataclass
class Reply:
    """What a stream's events have said: the reply in them so far, and where the stream stands."""

    pieces: list[str] = field(default_factory=list)  # the reply text (choice 0's), as it came
    deltas: int = 0  # events that carried content
    tool_calls: bool = False
    reasoning: bool = False
    other_choices: bool = False
    prompt_tokens: int | None = None  # as reported by the upstream
    completion_tokens: int | None = None
    identity: dict | None = None  # OpenAI: the first chunk's id, created and model
    open_block: int | None = None  # Anthropic: the content block started and not stopped yet
    blocks: int = 0  # Anthropic: content blocks started
    ended: bool = False  # the stream's own last event: [DONE], message_stop
    finished: bool = False  # a finish_reason, a stop_reason: complete, even if [DONE] or message_stop never comes
    errors: int = 0  # error events

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def chars(self) -> int:
        return sum(map(len, self.pieces))

    @property
    def has_content(self) -> bool:
        return self.deltas > 0

    @property
    def complete(self) -> bool:
        """Whether the reply needs nothing more than, perhaps, its end of stream."""
        return self.ended or self.finished

    def add(self, facts: EventFacts) -> None:
        if facts.text:
            self.pieces.append(facts.text)
        if facts.content:
            self.deltas += 1
        self.tool_calls |= facts.tool_call
        self.reasoning |= facts.reasoning
        self.other_choices |= facts.other_choice
        self.ended |= facts.end
        self.finished |= facts.finish
        self.errors += facts.error
        if facts.usage is not None:
            if facts.usage.prompt:
                self.prompt_tokens = facts.usage.prompt
            if facts.usage.completion:
                self.completion_tokens = facts.usage.completion  # cumulative: the last report counts
        if self.identity is None and facts.document is not None and "id" in facts.document and "choices" in facts.document:
            self.identity = {k: facts.document[k] for k in ("id", "created", "model") if k in facts.document}
        if facts.block is not None:
            if facts.block_closed:
                self.open_block = None if self.open_block == facts.block else self.open_block
            elif facts.document is not None and facts.document.get("type") == "content_block_start":
                self.open_block = facts.block
                self.blocks = max(self.blocks, facts.block + 1)

    def tokens_generated(self) -> int:
        """How many tokens of the reply there are: as reported, or else one per content event."""
        return max(self.completion_tokens or 0, self.deltas)


def read(api: Dialect, event: SseEvent) -> EventFacts:
    return NO_FACTS if event.data is None else api.read_event(event.data)


class ClientStream:
    """What a client's stream has been sent: its reply so far, and how to end it cleanly."""

    def __init__(self, api: Dialect) -> None:
        self.api = api
        self.reply = Reply()

    def sent(self, raw: bytes, facts: EventFacts) -> bytes:
        self.reply.add(facts)
        return raw

    def ending(self, problem: ProxyError | None) -> tuple[bytes, ProxyError | None]:
        """The bytes that end the stream cleanly, given why the upstream's part ended (None: it ended by itself),
        and what went wrong if anything did (None for a complete reply)."""
        api, reply = self.api, self.reply
        if reply.ended:
            return b"", None
        if problem is None and reply.finished:
            return api.end_after_finish, None
        problem = problem or stream_incomplete(api)
        error_event = b"" if reply.errors else api.error_event(problem)  # never a second error after the upstream's own
        return error_event + api.end_of_stream, problem


class UpstreamStream:
    """An upstream SSE response whose first content has arrived: the rest is still to be read. It owns the open
    connection until `close()`, which is idempotent: closing it stops the upstream generating for nobody.

    It is made by `read_first_event` and handed, with the attempt that opened it, to whoever relays it; the stream
    answer (stream_answer.py) closes it when the client's stream is over, whatever ended it."""

    def __init__(
        self, response: aiohttp.ClientResponse, api: Dialect, framer: SseFramer, first: list[tuple[SseEvent, EventFacts]]
    ) -> None:
        self.response = response
        self.api = api
        self.framer = framer
        self.first_events = first  # read while judging the first event (with what each says): not yet sent to anyone
        self.reply = Reply()  # what the upstream's events said, as far as they were piped
        self.received: bytearray | None = None  # when set, what is read after the first events (attempt flows)

    def keep(self, chunk: bytes) -> None:
        if self.received is not None and len(self.received) < RECEIVED_LIMIT:
            self.received += chunk[: RECEIVED_LIMIT - len(self.received)]

    def close(self) -> None:
        content = self.response.content
        if not content.is_eof() and content.exception() is None:
            # A read may be pending (IdleWatchdog, the shutdown): end it with an exception of our own. aiohttp (since
            # 3.10) would end it with one module-level instance, client_reqrep._CONNECTION_CLOSED_EXCEPTION, whose
            # traceback grows by the reader's frames at every raise: each stream ended so would stay in memory, its
            # flow included (found with tracemalloc and gc referrers under a soak of stalled streams).
            content.set_exception(aiohttp.ClientConnectionError("upstream response closed by seaking-proxy"))
        self.response.close()


async def read_first_event(
    response: aiohttp.ClientResponse,
    silence: float,
    deadline_at: float,
    api: Dialect,
    retry_empty: bool = True,
    overdue=None,
) -> tuple[UpstreamStream | None, bytes, Classification]:
    """Read until the first event with content, or an error before it; judge it. An UpstreamStream comes back only
    when content came first: until then nothing need reach the client, so whatever goes wrong can still be retried —
    an error event, an end with no content at all (`retry_empty`), a silence. Otherwise the response is closed here.
    The bytes read come back too (what the attempt flow shows).

    The upstream may take `silence` seconds for its first event, and as long again after each event without content
    (Anthropic's message_start and pings: it is alive, reading a long prompt), but never past `deadline_at`
    (time.monotonic()). An OpenAI stream has no such events: `silence` bounds the wait for its first event. With
    `overdue` (hedging), a silence that long does not end the attempt: `overdue` is set, so that the next attempt can
    start beside it, and this one reads on until the deadline."""
    framer = SseFramer()
    events: list[tuple[SseEvent, EventFacts]] = []
    prefetched = b""
    reply = Reply()
    window_start = time.monotonic()
    window = min(silence, deadline_at - window_start)
    error_first = None
    try:
        while not (reply.has_content or reply.ended or error_first):
            wait = window_start + window - time.monotonic()
            if wait <= 0 and overdue is not None:
                overdue.set()  # the next attempt starts beside this one, which reads on
                wait = deadline_at - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    chunk = await response.content.readany()
            except TimeoutError:
                if overdue is None or overdue.is_set():
                    raise
                continue  # the window has passed: overdue now
            new_events = framer.feed(chunk) if chunk else framer.end()
            prefetched += chunk
            new = [(event, read(api, event)) for event in new_events]
            for event, facts in new:
                if facts.error and not reply.has_content:
                    error_first = error_first or event.data
                reply.add(facts)
            events += new
            if not chunk:
                break
            if any(event.data is not None for event, _ in new):  # signs of life
                window_start = time.monotonic()
                window = min(silence, deadline_at - window_start)
    except TimeoutError:
        window = max(0.0, window)
        if overdue is not None and overdue.is_set():  # pragma: no cover - the run's deadline mostly closes it first
            detail = "no content from upstream within the deadline"
        elif not events:
            detail = f"no first event from upstream within {window:g} s"
        else:
            detail = f"upstream went silent for {window:g} s before any content"
        classification = Classification(Verdict.RETRY, detail, Failure.TIMEOUT)
    except (aiohttp.ClientError, OSError) as error:
        error.__traceback__ = None  # as in Pipe: the reader keeps its error, whose traceback would keep this frame
        classification = Classification(Verdict.RETRY, "upstream broke off the stream before its first event", Failure.NETWORK)
    except BaseException:  # cancelled: the client left, another attempt won, or the proxy is stopping
        response.close()
        raise
    else:
        if error_first is not None:
            detail = f"upstream stream began with an error: {error_first.decode('utf-8', 'replace')[:300]}"
            classification = Classification(Verdict.RETRY, detail, Failure.BROKEN)
        elif reply.has_content or (reply.complete and not retry_empty):
            return UpstreamStream(response, api, framer, events), prefetched, Classification(Verdict.SUCCESS)
        elif reply.complete:
            classification = Classification(Verdict.RETRY, "upstream answered with an empty reply", Failure.EMPTY)
        else:
            classification = Classification(Verdict.RETRY, "upstream ended the stream before its first event", Failure.BROKEN)
    response.close()
    return None, prefetched, classification


class IdleWatchdog:
    """Closes the upstream response when a read has waited longer than idle_timeout.

    One timer per stream that re-arms itself, instead of asyncio.timeout around every read: a timer scheduled and
    cancelled per chunk cost about 25 µs a chunk (cancelled timers pile up in the loop's heap). Only time spent
    waiting for the upstream counts: while the client is slow to take a chunk, the upstream is not idle.
    """

    def __init__(self, stream: UpstreamStream, idle_timeout: float) -> None:
        self._stream = stream
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
            self._stream.close()  # the pending read fails at once
        else:
            self._timer = self._loop.call_later(self._timeout - waited, self._check)

    def stop(self) -> None:
        self._timer.cancel()


class Pipe:
    """An upstream stream's events, one by one with what each says, until the stream ends: by itself (its end, or
    EOF), by a drop, by a silence of idle_timeout, or because `stop` resolved (to the error to end it with). After the
    iteration, `problem` says why it ended early; None when it ended by itself (complete or not: see the reply)."""

    def __init__(self, stream: UpstreamStream, idle_timeout: float, stop: asyncio.Future | None = None) -> None:
        self.stream = stream
        self.idle_timeout = idle_timeout
        self.stop = stop
        self.problem: ProxyError | None = None

    async def __aiter__(self) -> AsyncIterator[tuple[SseEvent, EventFacts]]:
        stream = self.stream
        watchdog = IdleWatchdog(stream, self.idle_timeout)
        content = stream.response.content
        stopped_by: ProxyError | None = None

        def stop_now(future: asyncio.Future) -> None:
            nonlocal stopped_by
            stopped_by = future.result()
            stream.close()  # the pending read fails at once

        if self.stop is not None:
            self.stop.add_done_callback(stop_now)
        try:
            for event, facts in stream.first_events:
                stream.reply.add(facts)
                yield event, facts
            while True:
                try:
                    watchdog.reading()
                    chunk = await content.readany()
                    watchdog.got_data()
                except (aiohttp.ClientError, OSError) as error:
                    # The reader keeps its error, and the error's traceback keeps this frame, which keeps the reader:
                    # a cycle that holds the whole stream (response, buffers, flow) until the cyclic GC runs. Broken.
                    error.__traceback__ = None
                    if not watchdog.fired and stopped_by is None:
                        self.problem = stream_interrupted()
                        last_words = _received_before_the_drop(content)
                        stream.keep(last_words)
                        for event in stream.framer.feed(last_words):
                            yield event, self._followed(event)
                    break
                if not chunk:
                    for event in stream.framer.end():
                        yield event, self._followed(event)
                    break
                stream.keep(chunk)
                for event in stream.framer.feed(chunk):
                    yield event, self._followed(event)
            if watchdog.fired:
                self.problem = stream_idle(self.idle_timeout)
            if stopped_by is not None:
                self.problem = stopped_by
        finally:
            watchdog.stop()
            if self.stop is not None:
                self.stop.remove_done_callback(stop_now)

    def _followed(self, event: SseEvent) -> EventFacts:
        facts = read(self.stream.api, event)
        self.stream.reply.add(facts)
        return facts


def _received_before_the_drop(content: aiohttp.StreamReader) -> bytes:
    """Bytes aiohttp had already received when the connection broke.

    StreamReader.readany raises the connection's error before it hands out what is still buffered, so under load the
    last chunks before a drop would be lost although they arrived; they belong to the client. (Private attributes,
    hence the getattr: on an aiohttp without them we lose those bytes, as plain aiohttp would.)
    """
    buffered = getattr(content, "_buffer", None)
    read_nowait = getattr(content, "_read_nowait", None)
    return read_nowait(-1) if buffered and read_nowait else b""
