"""What mitmweb's flow list says about a request at a glance: a mark, and the attempt history as the flow's comment
(the same line goes to the log when the flow is marked). Made from the flow's record once its answer is complete:

    2 attempts: timeout, 200 in 5.0 s                                                  marked 🔁
    4 attempts: 503 ×4 → gave up (502 by seaking-proxy) in 0.7 s                       marked ❌
    4 attempts: 503 ×4 → models from cache in 0.7 s                                    marked 🔁
    1 attempt: 200, stream broke after 412 chars in 3.1 s (stream_interrupted)         marked ❌

Every attempt is counted (runs of three or more of the same outcome as "503 ×4"), and the tokens the upstream reported
follow (`…, 1,204 → 356 tokens`). A request answered at its first attempt that reported no usage gets no note.
"""

from __future__ import annotations

import logging
from itertools import groupby
from typing import TYPE_CHECKING

from mitmproxy import http

from seaking.flows import is_client_flow
from seaking.records import AnsweredBy, AttemptRecord, FlowRecord, ResumeOutcome, ResumeRecord
from seaking.shutdown import SHUTDOWN_CODE
from seaking.streaming import CONTINUED_AFTER

if TYPE_CHECKING:
    from seaking.records import Records

logger = logging.getLogger("seaking")

RETRIED_MARK = ":repeat:"  # 🔁
FAILED_MARK = ":x:"  # ❌: the proxy gave up, or ended a stream with an error event
# How a stream that had begun ended, when it did not end well: by the error code it was ended with.
STREAM_PROBLEMS = {
    "stream_interrupted": "broke",
    "stream_idle_timeout": "went silent",
    "stream_incomplete": "ended early",
    "stream_upstream_error": "ended with an upstream error",
    SHUTDOWN_CODE: "was cut off by the shutdown",
}


class FlowNotes:
    """mitmproxy addon: marks and comments client flows from their record (records.py)."""

    name = "seaking.flow_notes"

    def __init__(self, records: Records) -> None:
        self.records = records

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def _annotate(self, flow: http.HTTPFlow) -> None:
        record = self.records.peek(flow) if is_client_flow(flow) else None
        if record is None or not record.attempts:
            return
        mark, comment = notes(record)
        if comment:
            flow.comment = comment
        if mark:
            flow.marked = mark
            # Only what went wrong goes to the log: a line per request would cost a fifth of a millisecond each, more
            # than any other part of the pipeline (mitmproxy hands every log record to every addon).
            log = logger.warning if mark == FAILED_MARK else logger.info
            log(f"{flow.request.method} {flow.request.path}: {comment}")


def notes(record: FlowRecord) -> tuple[str, str]:
    """The mark and comment for a client flow's record; ("", "") for a whole answer at the first attempt."""
    attempts = record.attempts
    stream_error = record.stream_error
    if record.gave_up:
        ending = "→ gave up" if stream_error else f"→ gave up ({record.status} by seaking-proxy)"
    elif record.answered_by in (AnsweredBy.MODELS_CACHE, AnsweredBy.MODELS_FALLBACK):
        ending = "→ models from cache" if record.answered_by is AnsweredBy.MODELS_CACHE else "→ models from models.fallback"
    elif stream_error:
        ending = describe_stream_end(stream_error, record.reply_chars or 0, record.duration or record.elapsed or 0.0)
    else:
        ending = ""
    resumed = "; ".join(describe_resume(r) for r in record.resumes)
    if resumed:
        ending = f"{ending}; {resumed}" if ending else f"→ {resumed}"
    if record.gave_up or stream_error:
        mark = FAILED_MARK
    else:
        mark = RETRIED_MARK if len(attempts) > 1 or record.resumes else ""
    tokens = record.tokens
    if len(attempts) == 1 and not ending and tokens is None:
        return mark, ""
    seconds = record.duration if record.duration is not None else record.elapsed  # a stream: until its last byte
    comment = describe_history(attempts, seconds or 0.0, ending)
    if tokens is not None:
        comment += f", {tokens[0]:,} → {tokens[1]:,} tokens"
    if stream_error:
        comment += f" ({stream_error})"
    return mark, comment


def describe_resume(resume: ResumeRecord) -> str:
    """'resumed after a drop at 412 chars', 'not resumed after a stall at 80 chars (the reply had tool calls)'."""
    broke = CONTINUED_AFTER.get(resume.after, resume.after)
    where = f"after {broke} at {resume.at_chars:,} char{'' if resume.at_chars == 1 else 's'}"
    if resume.outcome is ResumeOutcome.CONTINUED:
        return f"resumed {where}"
    why = {ResumeOutcome.REFUSED: "the upstream refused the prefill", ResumeOutcome.FAILED: "its continuation failed"}
    detail = resume.detail or why.get(resume.outcome, "")
    return f"not resumed {where}" + (f" ({detail})" if detail else "")


def describe_stream_end(problem: str | None, chars: int, seconds: float) -> str:
    """How a relayed stream ended: '→ success', or 'stream broke after 412 chars in 0.1 s'."""
    if problem is None:
        return "→ success"
    what = STREAM_PROBLEMS.get(problem, "ended with an error event")
    return f"stream {what} after {chars:,} char{'' if chars == 1 else 's'} in {seconds:.1f} s"


def describe_history(attempts: list[AttemptRecord], total_seconds: float, ending: str = "") -> str:
    """Every attempt, and how the request ended when no attempt's answer did: '3 attempts: 503 ×2, 200 in 1.4 s',
    '4 attempts: 503 ×3, timeout → gave up (504 by seaking-proxy) in 9.1 s'. With several targets or models, each
    attempt names where it went: '2 attempts: 503 a.example, 200 b.example in 0.3 s'. An ending that is not an arrow
    ('stream broke after …') says its own time."""
    hosts = len({a.target for a in attempts if a.target}) > 1
    models = len({a.model for a in attempts}) > 1
    labels = [
        " ".join(
            (["continuation"] if a.continuation else []) + [a.label] + ([a.target] if hosts and a.target else [])
            + ([str(a.model)] if models else [])
        )
        for a in attempts
    ]
    noun = "attempt" if len(attempts) == 1 else "attempts"
    history = f"{len(attempts)} {noun}: {', '.join(counted_runs(labels))}"
    if ending and not ending.startswith("→"):
        return f"{history}, {ending}"
    if ending:
        history += f" {ending}"
    return f"{history} in {total_seconds:.1f} s"


def counted_runs(labels: list[str]) -> list[str]:
    """Runs of three or more of the same label, counted: ['503', '503', '503', '200'] -> ['503 ×3', '200']."""
    out = []
    for label, run in groupby(labels):
        count = len(list(run))
        out.extend([f"{label} ×{count}"] if count >= 3 else [label] * count)
    return out
