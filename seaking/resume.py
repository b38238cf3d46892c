"""Continuing a reply that broke off mid-stream: whether it can be, and the continuation request. Pure.

A continuation request is the client's request unchanged, plus the text the client has of the reply as the start of
the assistant's answer — a trailing assistant message, merged into the client's own trailing assistant message if it
sent one (a SillyTavern prefill) — with max_tokens (or max_completion_tokens) lowered by what was generated already.
How a target takes that start is its `prefill` setting:

    assistant  a trailing assistant message: Anthropic, OpenRouter, most local servers
    prefix     the same message with "prefix": true: DeepSeek's and Mistral's form
    none       never continued there
    auto       assistant for the Messages API; none for OpenAI-compatible chat, because OpenAI's own models answer
               anew instead of continuing a trailing assistant message

Anthropic's prefill must not end in whitespace: it is trimmed here, and the stream's splice (splice.py) does not send
the client that whitespace twice when the continuation repeats it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from seaking.dialects import ANTHROPIC, Dialect
from seaking.streaming import Reply


class Prefill(enum.Enum):
    AUTO = "auto"
    ASSISTANT = "assistant"
    PREFIX = "prefix"
    NONE = "none"

    def resolved(self, api: Dialect) -> Prefill:
        if self is not Prefill.AUTO:
            return self
        return Prefill.ASSISTANT if api is ANTHROPIC else Prefill.NONE


def why_not_continued(request: dict, api: Dialect, reply: Reply) -> str | None:
    """Why a reply that broke off cannot be continued; None when it can (by a target that takes a prefill)."""
    if not isinstance(request.get("messages"), list) or not request["messages"]:
        return "the request has no messages"
    if reply.tool_calls:
        return "the reply was making a tool call"
    if reply.reasoning:
        return "the reply had reasoning in it"
    if reply.other_choices or request.get("n") not in (None, 1):
        return "several choices were asked for (n > 1)"
    if request.get("logprobs") or request.get("top_logprobs") is not None:
        return "logprobs were asked for"
    thinking = request.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
        return "extended thinking is on"
    if not reply.text.strip():
        return "no reply text had come yet"
    return None


@dataclass(frozen=True)
class Continuation:
    """What turns the client's request into a continuation of the reply it has so far."""

    text: str  # the reply as the client has it
    generated: int  # its tokens: reported by the upstream, or else one per content event
    number: int = 1  # the first continuation of this request, the second, ...

    def body(self, body: bytes, prefill: Prefill, api: Dialect) -> bytes:
        """The continuation request's body, from the client's (a fallback model already set in it)."""
        document = json.loads(body)
        messages = list(document["messages"])
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        if last.get("role") == "assistant":
            last = {**last, "content": _appended(last.get("content"), self.text)}
            messages[-1] = last
        else:
            last = {"role": "assistant", "content": self.text}
            messages.append(last)
        if api is ANTHROPIC:
            last["content"] = _trimmed_end(last["content"])
        if prefill is Prefill.PREFIX:
            last["prefix"] = True
        document["messages"] = messages
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(document.get(key), int) and not isinstance(document[key], bool):
                document[key] = max(1, document[key] - self.generated)
        return json.dumps(document).encode()


def _appended(content, text: str):
    """A message's content with `text` after it: a string, or a list of content parts (the last text part grows)."""
    if isinstance(content, list):
        parts = [dict(p) if isinstance(p, dict) else p for p in content]
        if parts and isinstance(parts[-1], dict) and parts[-1].get("type") == "text":
            parts[-1]["text"] = str(parts[-1].get("text", "")) + text
        else:
            parts.append({"type": "text", "text": text})
        return parts
    return (content if isinstance(content, str) else "") + text


def _trimmed_end(content):
    """Anthropic refuses a final assistant message that ends in whitespace."""
    if isinstance(content, list):
        parts = list(content)
        if parts and isinstance(parts[-1], dict) and isinstance(parts[-1].get("text"), str):
            parts[-1] = {**parts[-1], "text": parts[-1]["text"].rstrip()}
        return parts
    return content.rstrip()
