"""Errors the proxy makes itself: what went wrong, with a fitting status. How one looks on the wire — OpenAI's or
Anthropic's JSON before anything was sent to the client, an SSE error event after — is the API's (dialects.py).

The HTTP reason phrase carries a short form of the message: SillyTavern 1.19 shows only the reason phrase of a
failed non-streaming Custom call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REASON_LIMIT = 200


def reason_phrase(text: str) -> str:
    """A reason phrase HTTP/1.1 can carry: one line of Latin-1, not too long."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    text = text.encode("latin-1", "replace").decode("latin-1")
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


@dataclass(frozen=True)
class ProxyError:
    """An error the proxy reports itself; dialects.py renders it as a JSON response or an SSE error event."""

    status: int
    message: str
    code: str
    type: str | None = None  # OpenAI's error type; default: from the status (Anthropic's always is)
    retry_after: int | None = None
    attempts: int | None = None
    short: str | None = None  # the reason phrase; default: the message

    def extras(self) -> dict:
        """The optional fields both error documents carry beside the message."""
        extra = {"retry_after": self.retry_after, "attempts": self.attempts}
        return {k: v for k, v in extra.items() if v is not None}
