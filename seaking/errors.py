"""Errors the proxy makes itself: OpenAI-format JSON before anything was sent to the client, an SSE event after.

Every one is `{"error": {"message", "type", "code", ...}}` with a fitting status, and a short form of the message in
the HTTP reason phrase: SillyTavern 1.19 shows only the reason phrase of a failed non-streaming call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mitmproxy import http

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_REASON_LIMIT = 200


def error_type_for(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "api_error" if status < 500 else "upstream_error")


def reason_phrase(text: str) -> str:
    """A reason phrase HTTP/1.1 can carry: one line of Latin-1, not too long."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    text = text.encode("latin-1", "replace").decode("latin-1")
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


@dataclass(frozen=True)
class ProxyError:
    """An error the proxy reports itself: a JSON response before anything was sent, an SSE event after."""

    status: int
    message: str
    code: str
    type: str | None = None  # default: from the status
    retry_after: int | None = None
    attempts: int | None = None
    short: str | None = None  # the reason phrase; default: the message

    def document(self) -> dict:
        error = {"message": self.message, "type": self.type or error_type_for(self.status), "code": self.code}
        extra = {"retry_after": self.retry_after, "attempts": self.attempts}
        error.update({k: v for k, v in extra.items() if v is not None})
        return {"error": error}

    def response(self) -> http.Response:
        headers = {"content-type": "application/json"}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        response = http.Response.make(self.status, json.dumps(self.document()).encode(), headers)
        response.reason = reason_phrase(self.short or self.message)
        return response

    def sse_event(self) -> bytes:
        """One `data: {"error": ...}` event: SillyTavern shows its message, the OpenAI SDK raises it as APIError."""
        return b"data: " + json.dumps(self.document()).encode() + b"\n\n"
