"""Server-sent events, framed: a byte stream cut into whole events, whatever its chunks. Pure.

The proxy forwards an upstream stream event by event, never half of one, so that whatever it appends or splices in
(an error event, a continuation's events) is read as an event of its own, and an event cut off by a drop is never
half-delivered. Lines end in CRLF, LF or CR (the SSE standard allows all three); an event ends at a blank line. The
bytes of each event are passed on as they came: framing changes nothing in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event's end: a line terminator, then an empty line's. A lone CR at the very end of the data so far may be the
# first half of a CRLF: the framer waits for the next byte before it decides.
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event as it came, its blank line included
    name: str | None = None  # its `event:` field
    data: bytes | None = None  # its data lines joined by LF; None for an event without data (a comment: a heartbeat)


def parse_event(raw: bytes) -> SseEvent:
    """An event's fields, from its bytes (the blank line at its end may be there or not)."""
    name, data = None, []
    for line in _LINE_END.split(raw):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return SseEvent(raw, name, b"\n".join(data) if data else None)


class SseFramer:
    """Cuts a byte stream into whole events."""

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def partial(self) -> bytes:
        """What came after the last whole event: the start of one that has not ended (yet)."""
        return self._buffer

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk
        events, start = [], 0
        for end in _BLANK_LINE.finditer(buffer):
            if end.end() == len(buffer) and buffer.endswith(b"\r"):
                break  # "\r\r" so far: the second may be the start of a CRLF; wait for what follows
            events.append(parse_event(buffer[start:end.end()]))
            start = end.end()
        self._buffer = buffer[start:]
        return events

    def end(self) -> list[SseEvent]:
        """The stream has ended: an event its last byte completed ("\r\r", a CR CR blank line) is whole now. What
        is left after it is an event that never ended: dropped, as the SSE standard says."""
        if not self._buffer.endswith(b"\r"):
            return []
        events = self.feed(b"\n")  # a CRLF would have come by now: the CR alone ends the line
        if events:
            last = events[-1]
            events[-1] = parse_event(last.raw[:-1])  # without the LF that was never sent
        return events


def event_bytes(data: bytes, name: str | None = None) -> bytes:
    """One event, as the proxy writes it."""
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + data + b"\n\n"
