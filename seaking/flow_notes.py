"""What mitmweb's flow list says about a request at a glance: a mark, and the attempt history as the flow's comment
(the same line goes to the log). Made from the flow's record once its answer is complete:

    2 attempts: timeout, 200 in 5.0 s                                                marked 🔁
    4 attempts: 503 ×4 → gave up (502 by seaking-proxy) in 0.7 s                     marked ❌
    4 attempts: 503 ×4 → models from cache in 0.7 s                                  marked 🔁
    stream ended with an error event (stream_interrupted); 1 attempt: 200 in 0.4 s   marked ❌

Every attempt is counted (runs of three or more of the same outcome as "503 ×4"). A failure that the status cannot
show, because a stream had already been answered 200, comes first.
"""

from __future__ import annotations

import logging
from itertools import groupby

from mitmproxy import http

from seaking.flows import RECORD_KEY, is_client_flow

logger = logging.getLogger("seaking")

RETRIED_MARK = ":repeat:"  # 🔁
FAILED_MARK = ":x:"  # ❌: the proxy gave up, or ended a stream with an error event
_ANSWERED_FROM_STORE = {"models cache": "models from cache", "models fallback": "models from models.fallback"}


class FlowNotes:
    """mitmproxy addon: marks and comments client flows from their record (see flows.py)."""

    name = "seaking.flow_notes"

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def _annotate(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow):
            return
        flow_record = flow.metadata.get(RECORD_KEY, {})
        if not flow_record.get("attempts"):
            return
        mark, comment = notes(flow_record)
        if mark:
            flow.marked = mark
        if comment:
            flow.comment = comment
            log = logger.warning if mark == FAILED_MARK else logger.info
            log(f"{flow.request.method} {flow.request.path}: {comment}")


def notes(flow_record: dict) -> tuple[str, str]:
    """The mark and comment for a client flow's record; ("", "") for an answer at the first attempt."""
    attempts = flow_record["attempts"]
    answered_by = flow_record["answered_by"]
    stream_error = flow_record.get("stream_error")
    gave_up = answered_by == "seaking-proxy" and flow_record["verdict"] == "retry"
    if gave_up:
        ending = "gave up" if stream_error else f"gave up ({flow_record['status']} by seaking-proxy)"
    else:
        ending = _ANSWERED_FROM_STORE.get(answered_by)
    if gave_up or stream_error:
        mark = FAILED_MARK
    else:
        mark = RETRIED_MARK if len(attempts) > 1 else ""
    if len(attempts) == 1 and not ending and not stream_error:
        return mark, ""
    comment = describe_history(attempts, flow_record["elapsed"], ending)
    if stream_error:
        comment = f"stream ended with an error event ({stream_error}); {comment}"
    return mark, comment


def describe_history(attempts: list[dict], total_seconds: float, ending: str | None = None) -> str:
    """Every attempt, and how the request ended when no attempt's answer did: '3 attempts: 503 ×2, 200 in 1.4 s',
    '4 attempts: 503 ×3, timeout → gave up (504 by seaking-proxy) in 9.1 s'. With several targets or models, each
    attempt names where it went: '2 attempts: 503 a.example, 200 b.example in 0.3 s'."""
    hosts = len({a["target"] for a in attempts if a["target"]}) > 1
    models = len({a["model"] for a in attempts}) > 1
    labels = [
        " ".join([a["label"]] + ([a["target"]] if hosts and a["target"] else []) + ([str(a["model"])] if models else []))
        for a in attempts
    ]
    noun = "attempt" if len(attempts) == 1 else "attempts"
    history = ", ".join(counted_runs(labels))
    if ending:
        history += f" → {ending}"
    return f"{len(attempts)} {noun}: {history} in {total_seconds:.1f} s"


def counted_runs(labels: list[str]) -> list[str]:
    """Runs of three or more of the same label, counted: ['503', '503', '503', '200'] -> ['503 ×3', '200']."""
    out = []
    for label, run in groupby(labels):
        count = len(list(run))
        out.extend([f"{label} ×{count}"] if count >= 3 else [label] * count)
    return out
