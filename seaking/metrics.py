"""Prometheus metrics: `GET /_seaking/metrics` on the proxy's port (behind the access key, if one is set).

Made with prometheus_client. The facts come from each client flow's record once the flow is over (records.py) and from
the targets when Prometheus scrapes (targets.py): the exchange counts nothing itself. Labels carry API endpoints
("chat/completions"), targets as host[:port] and a few fixed words: never a key, a prompt or a URL path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mitmproxy import http
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from retry_policy import Failure, StopReason, Verdict
from seaking.flows import is_client_flow
from seaking.records import AnsweredBy, AttemptRecord, FlowRecord
from seaking.routing import endpoint_of
from seaking.shutdown import SHUTDOWN_CODE
from seaking.streaming import is_event_stream

if TYPE_CHECKING:
    from seaking.shared import Shared

METRICS_PATH = "/_seaking/metrics"
OWN_PATHS = "/_seaking/"  # the proxy's own endpoints are not API requests
# LLM answers take from a fraction of a second to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BREAKER_STATES = ("closed", "open", "half_open", "unknown")


def request_outcome(record: FlowRecord, failed: bool) -> str:
    """How a client request ended, in one word. `failed`: the flow ended in an error (the client left, mostly)."""
    if record.refused:
        return "shutdown" if record.refused == SHUTDOWN_CODE else "refused"
    if SHUTDOWN_CODE in (record.ended_early, record.stream_error):
        return "shutdown"
    if failed:
        return "client_left"
    if record.stream_error:
        return "stream_error"
    if record.answered_by in (AnsweredBy.MODELS_CACHE, AnsweredBy.MODELS_FALLBACK):
        return "models_cache"
    if record.verdict is None:
        return "refused"  # answered by the proxy before any attempt: a body that is not JSON, ...
    return "gave_up" if record.verdict is Verdict.RETRY else record.verdict.value  # success, pass_through, fail_fast


def attempt_result(attempt: AttemptRecord) -> str:
    """success, pass_through, fail_fast; or what failed: http_<status>, network, timeout, broken."""
    if attempt.verdict is not Verdict.RETRY:
        return attempt.verdict.value
    if attempt.failure is Failure.STATUS and attempt.status:
        return f"http_{attempt.status}"
    return attempt.failure.value if attempt.failure else "unknown"


class Metrics:
    """mitmproxy addon: counts client flows as they end; answers GET /_seaking/metrics."""

    name = "seaking.metrics"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # A registry of its own (not prometheus_client's global one): a script reload makes a fresh addon.
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "seaking_requests", "Client requests by API endpoint and how they ended.", ["endpoint", "outcome"], registry=registry
        )
        self.attempts = Counter(
            "seaking_upstream_attempts", "Upstream attempts by target (host:port) and result.", ["target", "result"],
            registry=registry,
        )
        self.retries = Counter("seaking_retries", "Upstream attempts after a request's first.", ["endpoint"], registry=registry)
        self.give_ups = Counter(
            "seaking_give_ups", "Requests whose every attempt failed, by why retrying stopped (attempts, deadline, budget).",
            ["reason"], registry=registry,
        )
        self.resumes = Counter(
            "seaking_stream_resumes",
            "Streams that broke off after content, by what became of the reply: continued, failed, refused (the "
            "upstream refused the prefill), not_possible (tool calls, reasoning, n > 1, the retry budget, ...).",
            ["outcome"], registry=registry,
        )
        self.tokens = Counter(
            "seaking_tokens",
            "Tokens the upstream reported (usage), by kind (prompt, completion), target (host:port) and model (one the "
            "upstream listed or the config names; any other is counted as \"other\").",
            ["kind", "target", "model"], registry=registry,
        )
        self.budget_refusals = Counter(
            "seaking_retry_budget_refusals", "Retries the retry budget refused (the request was answered with its failure).",
            registry=registry,
        )
        self.first_byte = Histogram(
            "seaking_time_to_first_byte_seconds",
            "From a request to the upstream's answer, or to a stream's first event.",
            ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.duration = Histogram(
            "seaking_request_duration_seconds", "From a request to the end of its answer (a stream's last byte).",
            ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._streams: set[str] = set()  # ids of flows whose event stream is flowing to the client
        Gauge("seaking_streams_in_flight", "Event streams flowing to clients now.", registry=registry).set_function(
            lambda: len(self._streams)
        )
        registry.register(_TargetStates(shared))

    def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or self.shared.records.is_answered(flow):
            return
        if flow.request.path == METRICS_PATH and flow.request.method == "GET":
            flow.response = http.Response.make(200, generate_latest(self.registry), {"content-type": CONTENT_TYPE_LATEST})

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if is_client_flow(flow) and is_event_stream(flow.response.headers.get("content-type", "")):
            self._streams.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow, failed=False)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow, failed=True)

    def _count(self, flow: http.HTTPFlow, failed: bool) -> None:
        self._streams.discard(flow.id)
        if not is_client_flow(flow) or flow.request.path.startswith(OWN_PATHS):
            return
        record = self.shared.records.of(flow)
        endpoint = record.endpoint or endpoint_of(flow.request.path) or "other"
        stream = "true" if record.stream else "false"
        self.requests.labels(endpoint, request_outcome(record, failed)).inc()
        self.duration.labels(endpoint, stream).observe(max(0.0, time.time() - flow.request.timestamp_start))
        for attempt in record.attempts:
            self.attempts.labels(attempt.target or "none", attempt_result(attempt)).inc()
        if len(record.attempts) > 1:
            self.retries.labels(endpoint).inc(len(record.attempts) - 1)
        if record.elapsed is not None:
            self.first_byte.labels(endpoint, stream).observe(record.elapsed)
        for resume in record.resumes:
            self.resumes.labels(resume.outcome.value).inc()
        self._count_tokens(record)
        if record.verdict is Verdict.RETRY and record.stopped is not None:
            self.give_ups.labels(record.stopped.value).inc()
            if record.stopped is StopReason.BUDGET:
                self.budget_refusals.inc()

    def _count_tokens(self, record: FlowRecord) -> None:
        if record.tokens is None or not self.shared.loaded:
            return
        snapshot = self.shared.snapshot
        for attempt in record.attempts:
            prompt, completion = attempt.prompt_tokens or 0, attempt.completion_tokens or 0
            if not (prompt or completion):
                continue
            model = snapshot.model_label(attempt.model)
            self.tokens.labels("prompt", attempt.target or "none", model).inc(prompt)
            self.tokens.labels("completion", attempt.target or "none", model).inc(completion)
            target = snapshot.targets_by_host.get(attempt.target)
            if target is not None:
                target.prompt_tokens += prompt
                target.completion_tokens += completion


class _TargetStates:
    """A prometheus_client collector: each target's breaker state, read when Prometheus scrapes."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def describe(self):
        return self._families([])

    def collect(self):
        return self._families(self.shared.snapshot.failover.targets if self.shared.loaded else [])

    @staticmethod
    def _families(targets) -> list:
        state = GaugeMetricFamily(
            "seaking_breaker_state",
            "1 for each target's circuit breaker state (position: 0 is target_proxy, then targets in order).",
            labels=["target", "position", "state"],
        )
        failures = GaugeMetricFamily(
            "seaking_breaker_consecutive_failures", "Consecutive failed attempts of each target.", labels=["target", "position"]
        )
        for position, target in enumerate(targets):
            for name in BREAKER_STATES:
                state.add_metric([target.host, str(position), name], 1.0 if target.state == name else 0.0)
            failures.add_metric([target.host, str(position)], target.breaker.consecutive_failures)
        return [state, failures]
