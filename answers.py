"""What the client gets: upstream answers passed on, and OpenAI-format errors made by the proxy.

Every error the proxy makes is `{"error": {"message", "type", "code", ...}}` with a fitting status, and a short form of
the message in the HTTP reason phrase: SillyTavern 1.19 shows only the reason phrase of a failed non-streaming call.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from mitmproxy import http

from retry_policy import error_message

# Never copied from the upstream: they describe the upstream connection or a body encoding aiohttp already undid.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "content-encoding",
     "upgrade", "te", "trailer"}
)

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


def forwardable_headers(raw_headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The upstream's response headers that describe the answer rather than the upstream connection."""
    decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers]
    return [(k, v) for k, v in decoded if k.lower() not in _NOT_FORWARDED]


def upstream_response(
    status: int, reason: str, raw_headers: list[tuple[bytes, bytes]], body: bytes, started: float
) -> http.Response:
    """The upstream's answer as received (aiohttp has already decoded any content-encoding)."""
    fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in forwardable_headers(raw_headers)]
    response = http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=reason.encode("latin-1", "replace"),
        headers=http.Headers(fields),
        content=None,
        trailers=None,
        timestamp_start=started,
        timestamp_end=time.time(),
    )
    response.content = body
    return response


def upstream_error_response(status: int, reason: str, raw_headers, body: bytes, started: float) -> http.Response:
    """A fail-fast upstream error: its own status and message, wrapped into OpenAI's shape when it is not already.

    The reason phrase carries the upstream's message so that SillyTavern users see why, not just "Unauthorized".
    """
    if _is_openai_error(body):
        response = upstream_response(status, reason, raw_headers, body, started)
        message = upstream_error_text(body)
    else:
        message = upstream_error_text(body) or reason or f"HTTP {status}"
        response = ProxyError(status, f"Upstream answered {status}: {message}", f"upstream_http_{status}").response()
    response.reason = reason_phrase(f"{reason or status}: {message}" if message != reason else message)
    return response


def upstream_error_text(body: bytes, limit: int = 1000) -> str:
    """The message in an upstream's error body: OpenAI's error.message, other common shapes, or the text itself."""
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:limit]
    return error_message(document)[:limit] if isinstance(document, dict) else ""


def _is_openai_error(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("error"), dict) and bool(document["error"].get("message"))
