"""A continuation's events spliced into the client's stream, as if the reply had never broken off.

The client has a stream that broke after some of the reply (resume.py asked the upstream to continue it). Its
continuation is a new upstream stream with its own preamble, ids and usage; the client must see one ordinary reply:

    OpenAI     chunks keep the first stream's `id`, `created` and `model`; the continuation's role preamble is dropped;
               its finish_reason and [DONE] are the reply's only ones (the first stream broke before its own); a usage
               chunk counts the tokens of both parts
    Anthropic  the continuation's message_start, and its content_block_start when the client's text block is still
               open, are swallowed; its deltas go on in the client's block index; its message_delta counts the output
               tokens of both parts; one message_stop

The seam: models often restate the last words of the text they continue, and Anthropic's prefill had to be sent
without its trailing whitespace, which the continuation then often repeats. `Seam` removes both (below, why it does
not eat a genuine repetition). Pure.
"""

from __future__ import annotations

import abc
import json

from seaking.dialects import ANTHROPIC, Dialect, EventFacts
from seaking.sse import SseEvent, event_bytes
from seaking.streaming import Reply

# A restatement is recognised only if the continuation *begins* by repeating at least this much of what it continues.
MIN_RESTATED_WORDS = 3
MIN_RESTATED_CHARS = 12
SEAM_WINDOW = 300  # characters at the end of the text so far where a restatement may start


class Seam:
    """Where a continuation's text meets the text the client has.

    Two things are removed from the continuation's start, nothing else:
      - a restatement: the continuation begins with the last words of the text it continues, at least
        MIN_RESTATED_WORDS whole words and MIN_RESTATED_CHARS characters, starting at a word boundary. A continuation
        that *genuinely* repeats three or more words exactly at the point where the stream happened to break is far
        rarer than a model restating its prefill, and shorter repeats ("ha ha", "no, no") are never touched: the rule
        errs on keeping text.
      - whitespace doubled: what the client already has beyond the text the upstream was given (`trimmed`:
        Anthropic's prefill must not end in whitespace, so " " or "\\n" after the last word was trimmed from it), when
        the continuation starts with that same whitespace; after a restatement, the whitespace the client has after
        the restated words.
    The continuation's text is held back only while it could still turn out to be a restatement."""

    def __init__(self, client_text: str, trimmed: bool) -> None:
        self.core = client_text.rstrip()
        self.after_core = client_text[len(self.core):]  # whitespace the client has after the last word
        self.dangling = self.after_core if trimmed else ""  # of that, what the upstream was not given
        self._candidates = _restatements(self.core)
        self._held = ""
        self._skip = ""  # whitespace the client has already: left out if the continuation's text goes on with it
        self.decided = not self._candidates and not self.dangling

    def feed(self, text: str) -> str:
        """The continuation's next text; what of it may go to the client now."""
        if self.decided:
            return self._without_doubled_whitespace(text) if self._skip else text
        self._held += text
        start = self._held.lstrip()
        if not start or any(len(c) > len(start) and c.startswith(start) for c in self._candidates):
            return ""  # it may still become a restatement
        return self.flush()

    def flush(self) -> str:
        """Decide on what is held (the continuation's text ends, or something other than text comes)."""
        if self.decided:
            return ""
        self.decided = True
        held, self._held = self._held, ""
        start = held.lstrip()
        restated = max((c for c in self._candidates if start.startswith(c)), key=len, default=None)
        rest, self._skip = (start[len(restated):], self.after_core) if restated else (held, self.dangling)
        return self._without_doubled_whitespace(rest)

    def _without_doubled_whitespace(self, text: str) -> str:
        shared = 0
        while shared < min(len(text), len(self._skip)) and text[shared] == self._skip[shared]:
            shared += 1
        # All of it was whitespace the client has: what is left of that may still come in the next text.
        self._skip = self._skip[shared:] if shared == len(text) else ""
        return text[shared:]


def _restatements(text: str) -> list[str]:
    """The ends of `text` a continuation could restate: from a word boundary, long enough to be recognised."""
    window_start = max(0, len(text) - SEAM_WINDOW)
    found = []
    for i in range(window_start, len(text)):
        if (i == 0 or text[i - 1].isspace()) and not text[i].isspace():
            tail = text[i:]
            if len(tail.split()) >= MIN_RESTATED_WORDS and len(tail) >= MIN_RESTATED_CHARS:
                found.append(tail)
    return found


class Splicer(abc.ABC):
    """Turns a continuation's events into the events the client's stream goes on with."""

    def __init__(self, api: Dialect, client: Reply) -> None:
        self.client = client  # what the client has been sent (read when the splice starts)
        self.seam = Seam(client.text, trimmed=api is ANTHROPIC)  # as resume.Continuation sends it
        self.tokens_before = client.tokens_generated()

    @abc.abstractmethod
    def splice(self, event: SseEvent, facts: EventFacts) -> list[bytes]:
        """The events to send the client for one event of the continuation (none, while text is held back)."""

    def flush(self) -> list[bytes]:
        """Text the seam still holds, as an event (the continuation's reply ended right after it)."""
        text = self.seam.flush()
        return [self._text_event(text)] if text else []

    @abc.abstractmethod
    def _text_event(self, text: str) -> bytes:
        """An event that adds `text` to the client's reply."""


class OpenAISplicer(Splicer):
    def splice(self, event: SseEvent, facts: EventFacts) -> list[bytes]:
        document = facts.document
        if facts.end or document is None or not isinstance(document.get("choices"), list):
            return self.flush() + [event.raw]  # [DONE], comments, what is not a chunk
        out = []
        chunk = {**document, **(self.client.identity or {})}
        choices = [dict(c) if isinstance(c, dict) else c for c in chunk["choices"]]
        chunk["choices"] = choices
        first = choices[0] if choices and isinstance(choices[0], dict) else None
        if first is not None and isinstance(first.get("delta"), dict):
            delta = {k: v for k, v in first["delta"].items() if k != "role"}  # the continuation's preamble
            if isinstance(delta.get("content"), str):
                delta["content"] = self.seam.feed(delta["content"])
                if not delta["content"]:
                    del delta["content"]
            elif delta or first.get("finish_reason"):
                out += self.flush()  # a tool call or the finish: the held text goes first
            first["delta"] = delta
        if first is not None and first.get("finish_reason"):
            out += self.flush()
        if isinstance(chunk.get("usage"), dict):
            chunk["usage"] = _with_earlier_tokens(chunk["usage"], "completion_tokens", self.tokens_before)
        if not _carries_anything(chunk):
            return out
        return out + [event_bytes(json.dumps(chunk).encode())]

    def _text_event(self, text: str) -> bytes:
        chunk = {**(self.client.identity or {}), "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        return event_bytes(json.dumps(chunk).encode())


class AnthropicSplicer(Splicer):
    def __init__(self, api: Dialect, client: Reply) -> None:
        super().__init__(api, client)
        self._blocks: dict[int, int] = {}  # the continuation's block index -> the client's
        self._text_block = client.open_block if client.open_block is not None else 0  # where held text goes

    def splice(self, event: SseEvent, facts: EventFacts) -> list[bytes]:
        document = facts.document
        kind = document.get("type") if document else None
        if kind == "message_start":
            return []  # the client's message goes on
        if kind == "content_block_start" and facts.block is not None:
            block = document.get("content_block") or {}
            if block.get("type") == "text" and self.client.open_block is not None and not self._blocks:
                self._blocks[facts.block] = self.client.open_block  # the client's text block goes on
                return []
            self._blocks[facts.block] = self.client.blocks + len(self._blocks)
            return self.flush() + [self._reindexed(event, document)]
        if kind == "content_block_delta" and facts.block is not None:
            document = {**document, "index": self._index(facts.block)}
            delta = document.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self._text_block = document["index"]
                text = self.seam.feed(delta["text"])
                return [self._text_event(text)] if text else []
            return self.flush() + [event_bytes(json.dumps(document).encode(), event.name)]
        if kind == "content_block_stop" and facts.block is not None:
            return self.flush() + [self._reindexed(event, document)]
        if kind == "message_delta" and isinstance(document.get("usage"), dict):
            usage = _with_earlier_tokens(document["usage"], "output_tokens", self.tokens_before)
            return self.flush() + [event_bytes(json.dumps({**document, "usage": usage}).encode(), event.name)]
        if kind in ("message_delta", "message_stop"):
            return self.flush() + [event.raw]
        return [event.raw]  # ping, comments, event types Anthropic may add

    def _index(self, continuation_index: int) -> int:
        return self._blocks.get(continuation_index, self.client.open_block if self.client.open_block is not None else 0)

    def _reindexed(self, event: SseEvent, document: dict) -> bytes:
        return event_bytes(json.dumps({**document, "index": self._index(document["index"])}).encode(), event.name)

    def _text_event(self, text: str) -> bytes:
        delta = {"type": "content_block_delta", "index": self._text_block, "delta": {"type": "text_delta", "text": text}}
        return event_bytes(json.dumps(delta).encode(), "content_block_delta")


def splicer_for(api: Dialect, client: Reply) -> Splicer:
    return AnthropicSplicer(api, client) if api is ANTHROPIC else OpenAISplicer(api, client)


def _with_earlier_tokens(usage: dict, key: str, earlier: int) -> dict:
    usage = {**usage}
    if isinstance(usage.get(key), int):
        usage[key] += earlier
        if isinstance(usage.get("total_tokens"), int):
            usage["total_tokens"] += earlier
    return usage


def _carries_anything(chunk: dict) -> bool:
    """Whether an OpenAI chunk still says something after the splice (else it is left out)."""
    if chunk.get("usage"):
        return True
    for choice in chunk["choices"]:
        if not isinstance(choice, dict):
            return True
        if choice.get("delta") or choice.get("finish_reason") or choice.get("text") or choice.get("index", 0) != 0:
            return True
    return False
