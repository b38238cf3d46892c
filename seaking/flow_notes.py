"""What mitmweb's flow list says about a request at a glance: a mark on retried flows, the attempt history as the
flow's comment, and the same line in the log. Made from the flow's record once its answer is complete."""

from __future__ import annotations

import logging

from mitmproxy import http

from seaking.flows import RECORD_KEY

logger = logging.getLogger("seaking")


class FlowNotes:
    """mitmproxy addon: marks and comments flows from their record (see flows.py)."""

    name = "seaking.flow_notes"

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def _annotate(self, flow: http.HTTPFlow) -> None:
        flow_record = flow.metadata.get(RECORD_KEY, {})
        attempts = flow_record.get("attempts")
        if not attempts:
            return
        proxy_made = flow_record["answered_by"] != "upstream"
        final = f"{flow_record['status']} (by seaking-proxy)" if proxy_made else None
        summary = describe_history(attempts, flow_record["elapsed"], final)
        comment = summary if len(attempts) > 1 or proxy_made else ""
        if flow_record.get("stream_error"):
            ending = f"stream ended by seaking-proxy: {flow_record['stream_error']}"
            comment = f"{comment}; {ending}" if comment else ending
        if len(attempts) > 1:
            flow.marked = ":repeat:"
            logger.info(f"{flow.request.method} {flow.request.path}: {summary}")
        if comment:
            flow.comment = comment


def describe_history(attempts: list[dict], total_seconds: float, final: str | None = None) -> str:
    """'3 attempts: 503, 503 → 200 in 1.4 s'; with several targets or models, each attempt also names where it went:
    '2 attempts: 503 a.example → 200 b.example in 0.3 s'."""
    hosts = len({a["target"] for a in attempts if a["target"]}) > 1
    models = len({a["model"] for a in attempts}) > 1
    labels = [
        " ".join([a["label"]] + ([a["target"]] if hosts and a["target"] else []) + ([str(a["model"])] if models else []))
        for a in attempts
    ]
    if final and (hosts or models):
        final = f"{final} after {labels[-1]}"
    end = final or labels[-1]
    earlier = ", ".join(labels[:-1])
    noun = "attempt" if len(attempts) == 1 else "attempts"
    path = f"{earlier} → {end}" if earlier else end
    return f"{len(attempts)} {noun}: {path} in {total_seconds:.1f} s"
