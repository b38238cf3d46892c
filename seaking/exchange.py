"""The upstream exchange, from the request hook: where a request is routed, retried and answered.

mitmproxy does not talk to the upstream for the proxy's flows: it has no upstream timeouts and cannot answer the
client after its own attempt failed. So the request hook runs the exchange (upstream.py: attempts over targets and
fallback models, classified and retried by retry_policy.py) and answers: a whole response on the flow, or — once the
first event of a stream is in — the open upstream stream handed to the relay, which mitmproxy streams from. A client
that waits `heartbeat_interval` with nothing gets a committed SSE answer with heartbeats instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from retry_policy import Outcome, Verdict
from seaking.answers import failure_in_stream, final_answer, forwardable_headers
from seaking.attempt_flows import attempt_summary, waits_before
from seaking.config import Config
from seaking.dialects import Dialect, dialect_for, dialect_of
from seaking.errors import ProxyError
from seaking.flows import is_answered, is_client_flow, is_replay, record, show_upstream
from seaking.redaction import scrub, scrub_response
from seaking.relay import RelayJob
from seaking.routing import Route, route
from seaking.streaming import LiveStream, client_stream
from seaking.upstream import Failover, UpstreamAttempt, UpstreamRequest

logger = logging.getLogger("seaking")

SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
# How often a waiting request checks whether its client is still there. mitmproxy tells no hook that a client left
# while a request is pending (its client_disconnected hook comes only after the flow ends), but marks the connection.
CLIENT_CHECK_SECONDS = 0.25
INTERNAL_ERROR = ProxyError(
    500, "seaking-proxy failed to handle this request (a bug: its log says what went wrong); it was not sent upstream.",
    "proxy_internal_error",
)


class Exchange:
    """mitmproxy addon: answers every client flow that no earlier addon answered, from the upstream."""

    name = "seaking.exchange"

    def __init__(self, shared) -> None:
        self.shared = shared

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or is_answered(flow):
            return
        secrets = self.shared.redaction.client_secrets(flow) | self.shared.configured_secrets()
        # A config reload while this request runs changes nothing for it: it keeps the config and targets it began with.
        try:
            answer = await self._answer(flow, self.shared.config, self.shared.failover, secrets)
        except Exception:
            # A bug of ours. Left unanswered, mitmproxy would send the request upstream itself: unretried, with the
            # key placeholder, and its error as an HTML page. The client gets a clear error instead.
            logger.exception(f"{flow.request.method} {flow.request.path}: seaking-proxy failed to handle the request")
            answer = dialect_of(flow.request).error_response(INTERNAL_ERROR)
        if answer is None:
            return  # a streaming answer: mitmproxy fetches it from the relay
        if answer.status_code >= 400:
            scrub_response(answer, secrets)
        flow.response = answer

    async def _answer(
        self, flow: http.HTTPFlow, config: Config, failover: Failover, secrets: set[str]
    ) -> http.Response | None:
        """The answer for the client, or None when the flow was handed to the relay for a streaming answer."""
        request = flow.request
        flow_record = record(flow)
        client_path = request.path
        primary = route(failover.pool.targets[0].base_url, client_path)  # URLs come per attempt
        api = dialect_for(primary.endpoint, request.headers)  # the shape of every error and stream ending we make
        flow_record.update(endpoint=primary.endpoint, client_path=client_path)
        wants_stream = flow_record.get("stream") is True
        started = time.time()
        exchange = asyncio.create_task(
            self.shared.upstream.exchange(
                config.retry,
                UpstreamRequest(
                    method=request.method,
                    path=client_path,
                    headers=self.shared.redaction.client_headers(flow),
                    body=request.raw_content or b"",
                    expects_json=primary.endpoint is not None,
                    api=api,
                    model=flow_record.get("model"),
                    first_event_timeout=config.streaming.first_event_timeout if wants_stream else None,
                ),
                failover,
                on_retry=lambda last, number, wait: self._log_retry(config, request.method, last, number, wait, secrets),
                on_attempt=lambda attempt: self.shared.attempt_flows.note(flow, attempt, secrets),
            )
        )
        heartbeat_after = config.streaming.heartbeat_interval if wants_stream else None
        grace_over = self.shared.shutdown.grace_over
        if not await _while_client_waits(flow, exchange, heartbeat_after, grace_over):
            if _client_left(flow):
                exchange.cancel()  # nobody to answer: stop spending upstream work on it
                flow.kill()
                return None
            if grace_over.done():  # the proxy is shutting down and this request has had its time
                exchange.cancel()
                flow_record.update(ended_early=grace_over.result().code, answered_by="seaking-proxy", status=503)
                return api.error_response(grace_over.result())
            await self._stream_with_heartbeats(flow, config, primary, api, exchange, started, secrets)
            return None
        outcome, history = await exchange
        last = outcome.last
        answered_from = route(last.target.base_url, client_path)
        if last.stream is not None:
            self._record(flow, outcome, history, started, secrets, proxy_made=False, status=last.status)
            headers = forwardable_headers(last.raw_headers) + list(seaking_headers(outcome).items())
            await self._relay(
                flow, config, answered_from, api, last.status, headers, _resolved(last.stream), reason=last.reason
            )
            return None
        # Show the true upstream in mitmweb and recordings.
        show_upstream(flow, answered_from.url)
        answer = final_answer(outcome, config.retry, time.time() - started, started, api)
        answer.headers.update(seaking_headers(outcome))
        proxy_made = last.classification.verdict is Verdict.RETRY
        self._record(flow, outcome, history, started, secrets, proxy_made, answer.status_code)
        return answer

    async def _stream_with_heartbeats(
        self,
        flow: http.HTTPFlow,
        config: Config,
        primary: Route,
        api: Dialect,
        exchange: asyncio.Task,
        started: float,
        secrets: set[str],
    ) -> None:
        """The client has waited heartbeat_interval with nothing: commit a 200 SSE answer now, and keep it alive
        with heartbeats until the exchange brings a stream to pipe or a failure to report as an error event."""

        record(flow)["heartbeats"] = True

        async def stream_or_error() -> LiveStream | bytes | ProxyError:
            outcome, history = await exchange
            last = outcome.last
            self._record(flow, outcome, history, started, secrets, proxy_made=last.stream is None, status=200)
            if last.stream is not None:
                return last.stream
            if last.classification.verdict is Verdict.SUCCESS:
                replay = api.whole_as_stream(last.body)  # the upstream ignored "stream": true
                if replay is not None:
                    return replay
            error = failure_in_stream(outcome, config.retry, time.time() - started)
            return dataclasses.replace(error, message=scrub(error.message, secrets))

        await self._relay(flow, config, primary, api, 200, SSE_HEADERS, asyncio.create_task(stream_or_error()), exchange)

    async def _relay(
        self,
        flow: http.HTTPFlow,
        config: Config,
        target: Route,
        api: Dialect,
        status: int,
        headers: list[tuple[str, str]],
        outcome: asyncio.Future,
        exchange: asyncio.Task | None = None,
        reason: str | None = None,
    ) -> None:
        """Hand the flow to the relay, which sends status and headers, then the stream `outcome` resolves to."""
        streaming = config.streaming

        def release() -> None:
            for task in (outcome, exchange):
                if task is not None:
                    task.cancel()
                # What finished just before the cancel may hold an open upstream stream that nobody will read.
                live = _stream_left_in(task)
                if live is not None:
                    live.close()

        def report(problem: ProxyError) -> None:
            logger.warning(f"{flow.request.method} {target.url}: {problem.message} Ended the stream with an error event.")
            record(flow)["stream_error"] = problem.code

        body = client_stream(
            outcome,
            heartbeat_interval=streaming.heartbeat_interval,
            idle_timeout=streaming.idle_timeout,
            api=api,
            on_problem=report,
            stop=self.shared.shutdown.grace_over,
        )
        await self.shared.relay.serve(flow, RelayJob(status, headers, body, on_close=release), shown_url=target.url)

    def _record(
        self,
        flow: http.HTTPFlow,
        outcome: Outcome[UpstreamAttempt],
        history: list[UpstreamAttempt],
        started: float,
        secrets: set[str],
        proxy_made: bool,
        status: int,
    ) -> None:
        """What happened, in the flow's record: for the flow notes, the models cache and people reading recordings."""
        record(flow).update(
            attempts=[attempt_summary(a, secrets, wait) for a, wait in zip(history, waits_before(history))],
            elapsed=round(time.time() - started, 3),
            verdict=outcome.last.classification.verdict.value,
            stopped=outcome.stopped.value,
            answered_by="seaking-proxy" if proxy_made else "upstream",
            status=status,
        )

    def _log_retry(
        self, config: Config, method: str, last: UpstreamAttempt, number: int, wait: float, secrets: set[str]
    ) -> None:
        where = last.target.host if last.target else "upstream"
        logger.info(
            f"{method} {where}: attempt {number} of at most {config.retry.max_attempts} failed: "
            f"{scrub(last.classification.detail, secrets)}; retrying in {wait:.1f} s"
        )


def seaking_headers(outcome: Outcome[UpstreamAttempt]) -> dict[str, str]:
    """Where an answer came from: attempts, the target's host (never its URL or key), the model."""
    last = outcome.last
    headers = {"x-seaking-attempts": str(outcome.attempts)}
    if last.target is not None:
        headers["x-seaking-target"] = last.target.host
    if last.model:
        headers["x-seaking-model"] = last.model
    return headers


def _client_left(flow: http.HTTPFlow) -> bool:
    # The client closed its side. HTTP allows a client to half-close after its request, but no LLM client does; one
    # that closes while waiting for its answer has left (a browser tab closed, SillyTavern's Stop button).
    # A replay has no client connection to leave (its flow keeps the original one, long closed).
    return not is_replay(flow) and not flow.client_conn.state & ConnectionState.CAN_READ


async def _while_client_waits(
    flow: http.HTTPFlow, task: asyncio.Task, timeout: float | None, grace_over: asyncio.Future
) -> bool:
    """Wait for `task` for at most `timeout` seconds (None: no limit), but no longer than the client stays or the
    shutdown's grace period lasts. True when the task is done."""
    loop = asyncio.get_running_loop()
    until = None if timeout is None else loop.time() + timeout
    while not task.done() and not _client_left(flow) and not grace_over.done():
        step = CLIENT_CHECK_SECONDS if until is None else min(CLIENT_CHECK_SECONDS, until - loop.time())
        if step <= 0:
            break
        await asyncio.wait({task, grace_over}, timeout=step, return_when=asyncio.FIRST_COMPLETED)
    return task.done()


def _stream_left_in(task: asyncio.Future | None) -> LiveStream | None:
    """The open upstream stream a finished task produced: the stream itself, or an exchange's (outcome, history)."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    result = task.result()
    if isinstance(result, tuple):
        result = result[0].last.stream
    return result if isinstance(result, LiveStream) else None


def _resolved(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
