"""What the client gets when the exchange is over: the upstream's answer passed on, or why the proxy gave up."""

from __future__ import annotations

import html
import json
import logging
import math
import re
import textwrap
import time

from mitmproxy import http

from retry_policy import Failure, Outcome, RetryPolicy, StopReason, Verdict, error_message
from seaking.dialects import Dialect
from seaking.errors import ProxyError, reason_phrase
from seaking.attempt import Attempt
from seaking.upstream_run import UpstreamResult

logger = logging.getLogger("seaking")

INTERNAL_ERROR = ProxyError(
    500, "seaking-proxy failed to handle this request (a bug: its log says what went wrong); it was not sent upstream.",
    "proxy_internal_error",
)

# Never copied from the upstream: they describe the upstream connection or a body encoding aiohttp already undid.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "content-encoding",
     "upgrade", "te", "trailer"}
)


_NOT_FORWARDED_RAW = frozenset(name.encode() for name in _NOT_FORWARDED)


def forwardable_headers(raw_headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The upstream's response headers that describe the answer rather than the upstream connection."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in _forwardable(raw_headers)]


def _forwardable(raw_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in raw_headers if k.lower() not in _NOT_FORWARDED_RAW]


def upstream_response(
    status: int, reason: str, raw_headers: list[tuple[bytes, bytes]], body: bytes, started: float
) -> http.Response:
    """The upstream's answer as received (aiohttp has already decoded any content-encoding)."""
    response = http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=reason.encode("latin-1", "replace"),
        headers=http.Headers(_forwardable(raw_headers)),
        content=None,
        trailers=None,
        timestamp_start=started,
        timestamp_end=time.time(),
    )
    response.content = body
    return response


def upstream_error_response(
    status: int, reason: str, raw_headers, body: bytes, started: float, api: Dialect
) -> http.Response:
    """A fail-fast upstream error: its own status, headers and message, the body wrapped into the API's error shape
    when it is not an error document already. What the upstream said about retrying (x-should-retry, retry-after)
    is passed on as it said it.

    The reason phrase carries the upstream's message so that SillyTavern users see why, not just "Unauthorized".
    """
    response = upstream_response(status, reason, raw_headers, body, started)
    message = upstream_error_text(body)
    if not _is_error_document(body):
        message = message or reason or f"HTTP {status}"
        wrapped = ProxyError(status, f"Upstream answered {status}: {message}", f"upstream_http_{status}")
        response.content = json.dumps(api.error_document(wrapped)).encode()
        response.headers["content-type"] = "application/json"
    response.reason = reason_phrase(f"{reason or status}: {message}" if message != reason else message)
    return response


def upstream_error_text(body: bytes, limit: int = 1000) -> str:
    """The message in an upstream's error body: error.message (OpenAI's and Anthropic's), other common shapes, an
    HTML page's title (Cloudflare's 52x pages, a gateway's 502), or the text itself."""
    try:
        document = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        title = _HTML_TITLE.search(text[:4000])
        if title:
            text = " ".join(html.unescape(title.group(1)).split())
        return text[:limit]
    return error_message(document)[:limit] if isinstance(document, dict) else ""


_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _is_error_document(body: bytes) -> bool:
    """OpenAI's `{"error": {"message"}}` or Anthropic's `{"type": "error", "error": {"message"}}`: either API's
    clients read error.message."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("error"), dict) and bool(document["error"].get("message"))


# --- what the client gets when the exchange is over -------------------------------------------------------------------


def final_answer(result: UpstreamResult, policy: RetryPolicy, elapsed: float, started: float, api: Dialect) -> http.Response:
    """The answer to a request that nothing has been sent for yet."""
    last = result.last
    verdict = last.classification.verdict
    if verdict in (Verdict.SUCCESS, Verdict.PASS_THROUGH):
        return upstream_response(last.status, last.reason, last.raw_headers, last.body, started)
    if verdict is Verdict.FAIL_FAST:
        return upstream_error_response(last.status, last.reason, last.raw_headers, last.body, started, api)
    return api.error_response(gave_up(result, policy, elapsed))


def failure_in_stream(result: UpstreamResult, policy: RetryPolicy, elapsed: float) -> ProxyError:
    """Any outcome but a stream, as the error event of a stream that has already begun (with heartbeats)."""
    last = result.last
    if last.classification.verdict is Verdict.RETRY:
        return gave_up(result, policy, elapsed)
    message = upstream_error_text(last.body, 300) or last.reason
    return ProxyError(
        last.status, f"Upstream answered {last.status}: {message}", f"upstream_http_{last.status}",
        attempts=result.outcome.attempts,
    )


def gave_up(result: UpstreamResult, policy: RetryPolicy, elapsed: float) -> ProxyError:
    """Every attempt failed: say what happened last, and after how many attempts.

    The status: a Retry-After past the deadline is 429 with retry_after; the upstream's own status when it kept
    answering a retry code; 504 for timeouts; 502 for an unreachable upstream, broken answers or empty replies.
    """
    outcome, last = result.outcome, result.last
    attempts = outcome.attempts
    tried = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s"
    if outcome.stopped is StopReason.DEADLINE and last.retry_after is not None:
        wait = math.ceil(outcome.refused_wait or last.retry_after)
        return ProxyError(
            429,
            f"Upstream is rate limiting (it answered {last.status} and asked to wait {wait} s, which would pass "
            f"the {policy.deadline:g} s deadline); {tried}. Try again in {wait} s.",
            "rate_limited",
            retry_after=wait,
            attempts=attempts,
        )
    if outcome.stopped is StopReason.DEADLINE:
        tried += f" (the {policy.deadline:g} s deadline was reached)"
    elif outcome.stopped is StopReason.BUDGET:
        tried += " (retry budget spent: the upstream is failing for many requests, so retries are paused)"
    failure = last.classification.failure
    detail = last.classification.detail
    retry_after = None
    if failure is Failure.STATUS:
        upstream_said = upstream_error_text(last.body, 300)
        if upstream_said:
            detail += f" ({upstream_said})"
        if last.retry_after is not None:
            retry_after = math.ceil(last.retry_after)
        status, code = last.status, f"upstream_http_{last.status}"
    elif failure is Failure.TIMEOUT:
        if last.hedged:
            detail = (
                f"no attempt answered within the {policy.deadline:g} s deadline (each one that had not answered "
                f"within {policy.per_try_timeout:g} s kept running beside the next)"
            )
        elif last.status is None:  # no headers; with headers, it was the first SSE event that never came
            detail = f"no response headers from upstream within {policy.per_try_timeout:g} s"
        status, code = 504, "upstream_timeout"
    elif failure is Failure.BROKEN:
        status, code = 502, "upstream_bad_response"
    elif failure is Failure.EMPTY:
        blank = sum(a.classification.failure is Failure.EMPTY for a in result.attempts)
        detail = f"upstream answered with an empty reply {blank} time{'s' if blank != 1 else ''} (no text, no tool call)"
        status, code = 502, "upstream_empty_reply"
    else:
        status, code = 502, "upstream_unreachable"
    detail = f"{detail[0].upper()}{detail[1:]}"
    # SillyTavern shows only the reason phrase, cut at 200 characters: keep the attempt count in it however long
    # the upstream's own message is.
    short = f"{textwrap.shorten(detail, 120, placeholder='...')}; {tried}"
    return ProxyError(status, f"{detail}; {tried}.", code, retry_after=retry_after, attempts=attempts, short=short)


def seaking_headers(outcome: Outcome[Attempt]) -> dict[str, str]:
    """Where an answer came from: attempts, the target's host (never its URL or key), the model."""
    last = outcome.last
    headers = {"x-seaking-attempts": str(outcome.attempts), "x-seaking-target": last.target.host}
    if last.model:
        headers["x-seaking-model"] = last.model
    return headers


def internal_error(flow: http.HTTPFlow, api: Dialect) -> http.Response:
    """The answer to a request a bug of ours broke off; the log says what went wrong."""
    logger.exception(f"{flow.request.method} {flow.request.path}: seaking-proxy failed to handle the request")
    return api.error_response(INTERNAL_ERROR)
