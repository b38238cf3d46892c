"""The upstream exchange, from the request hook: where a request is routed, retried and answered.

mitmproxy does not talk to the upstream for the proxy's flows: it has no upstream timeouts and cannot answer the
client after its own attempt failed. So the request hook runs the exchange (upstream.py: attempts over targets and
fallback models, classified and retried by retry_policy.py) and answers with a whole response on the flow. A stream
("stream": true) is bound to the relay at once, and answered there once the exchange is over: the open upstream
stream (its first event judged good), or its failure as a whole answer. A client that waits `heartbeat_interval`
with nothing gets a committed SSE answer with heartbeats instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

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


@dataclass
class _Call:
    """One client request on its way through the exchange: what each step of answering it needs. A config reload
    while it runs changes nothing for it: it keeps the config and targets it began with."""

    flow: http.HTTPFlow
    config: Config
    failover: Failover
    primary: Route  # the request routed onto the first target: its endpoint, the URL a committed stream shows
    api: Dialect  # the shape of every error and stream ending the proxy makes for it
    secrets: set[str]  # never to be shown: the client's keys and the proxy's
    started: float = dataclasses.field(default_factory=time.time)

    def record(self, outcome: Outcome[UpstreamAttempt], history: list[UpstreamAttempt], proxy_made: bool,
               status: int) -> None:
        """What happened, in the flow's record: for the flow notes, the models cache, metrics and recordings."""
        waits = waits_before(history)
        record(self.flow).update(
            attempts=[attempt_summary(a, self.secrets, wait) for a, wait in zip(history, waits, strict=True)],
            elapsed=round(time.time() - self.started, 3),
            verdict=outcome.last.classification.verdict.value,
            stopped=outcome.stopped.value,
            answered_by="seaking-proxy" if proxy_made else "upstream",
            status=status,
        )


class Exchange:
    """mitmproxy addon: answers every client flow that no earlier addon answered, from the upstream."""

    name = "seaking.exchange"

    def __init__(self, shared) -> None:
        self.shared = shared
        self._deliveries: set[asyncio.Task] = set()

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or is_answered(flow):
            return
        secrets = self.shared.redaction.client_secrets(flow) | self.shared.configured_secrets()
        try:
            answer = await self._answer(flow, secrets)
        except Exception:
            # A bug of ours. Left unanswered, mitmproxy would send the request upstream itself: unretried, with the
            # key placeholder, and its error as an HTML page. The client gets a clear error instead.
            answer = _internal_error(flow, dialect_of(flow.request))
        if answer is None:
            return  # a streaming answer: mitmproxy fetches it from the relay
        if answer.status_code >= 400:
            scrub_response(answer, secrets)
        flow.response = answer

    async def _answer(self, flow: http.HTTPFlow, secrets: set[str]) -> http.Response | None:
        """The answer for the client, or None when the flow was handed to the relay for a streaming answer."""
        request = flow.request
        config, failover = self.shared.config, self.shared.failover
        flow_record = record(flow)
        client_path = request.path
        primary = route(failover.pool.targets[0].base_url, client_path)  # URLs come per attempt
        call = _Call(flow, config, failover, primary, dialect_for(primary.endpoint, request.headers), secrets)
        flow_record.update(endpoint=primary.endpoint, client_path=client_path)
        wants_stream = flow_record.get("stream") is True
        exchange = self.shared.upstream.exchange(
            config.retry,
            UpstreamRequest(
                method=request.method,
                path=client_path,
                headers=self.shared.redaction.client_headers(flow),
                body=request.raw_content or b"",
                expects_json=primary.endpoint is not None,
                api=call.api,
                model=flow_record.get("model"),
                first_event_timeout=config.streaming.first_event_timeout if wants_stream else None,
            ),
            failover,
            on_retry=lambda last, number, wait: self._log_retry(call, last, number, wait),
            on_attempt=lambda attempt: self.shared.attempt_flows.note(flow, attempt, secrets),
        )
        if wants_stream:
            await self._answer_stream_later(call, asyncio.create_task(exchange))
            return None
        grace_over = self.shared.shutdown.grace_over
        try:
            async with _WhileClientWaits(flow, grace_over):
                outcome, history = await exchange
        except _ClientGone:  # nobody to answer: the exchange was cancelled, so no upstream work is spent on it
            flow.kill()
            return None
        except _GraceOver:
            return self._ended_early(call, grace_over.result())
        return self._whole_answer(call, outcome, history)

    def _whole_answer(
        self, call: _Call, outcome: Outcome[UpstreamAttempt], history: list[UpstreamAttempt]
    ) -> http.Response:
        """The answer, when the exchange ended without a stream to relay."""
        last = outcome.last
        # Show the true upstream in mitmweb and recordings.
        show_upstream(call.flow, route(last.target.base_url, record(call.flow)["client_path"]).url)
        answer = final_answer(outcome, call.config.retry, time.time() - call.started, call.started, call.api)
        answer.headers.update(seaking_headers(outcome))
        proxy_made = last.classification.verdict is Verdict.RETRY
        call.record(outcome, history, proxy_made=proxy_made, status=answer.status_code)
        return answer

    def _ended_early(self, call: _Call, error: ProxyError) -> http.Response:
        """The proxy is shutting down and this request has had its grace period."""
        record(call.flow).update(ended_early=error.code, answered_by="seaking-proxy", status=error.status)
        return call.api.error_response(error)

    async def _answer_stream_later(self, call: _Call, exchange: asyncio.Task) -> None:
        """A stream is answered through the relay, whatever the exchange brings: the flow is bound to it now and the
        request hook returns, so that mitmproxy connects to the relay while the upstream is still thinking (the
        connection costs the client nothing then), and the answer is served there once it is known. A client that
        leaves before then drops mitmproxy's connection to the relay, which ends the exchange at once."""
        delivery: asyncio.Task | None = None

        def abandoned() -> None:
            if delivery is not None:
                delivery.cancel()

        await self.shared.relay.bind(call.flow, call.primary.url, on_abandoned=abandoned)
        delivery = asyncio.create_task(self._deliver_stream(call, exchange))
        self._deliveries.add(delivery)  # tasks are only weakly held by the loop
        delivery.add_done_callback(self._deliveries.discard)

    async def _deliver_stream(self, call: _Call, exchange: asyncio.Task) -> None:
        relay, grace_over = self.shared.relay, self.shared.shutdown.grace_over
        try:
            await asyncio.wait(
                {exchange, grace_over},
                timeout=call.config.streaming.heartbeat_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if exchange.done():
                outcome, history = exchange.result()
                last = outcome.last
                if last.stream is None:
                    answer = self._whole_answer(call, outcome, history)
                    if answer.status_code >= 400:
                        scrub_response(answer, call.secrets)
                    relay.serve_now(call.flow, RelayJob.whole(answer))
                    return
                answered_from = route(last.target.base_url, record(call.flow)["client_path"])
                call.record(outcome, history, proxy_made=False, status=last.status)
                headers = forwardable_headers(last.raw_headers) + list(seaking_headers(outcome).items())
                await self._relay(call, answered_from, last.status, headers, _resolved(last.stream), reason=last.reason)
            elif grace_over.done():
                exchange.cancel()
                relay.serve_now(call.flow, RelayJob.whole(self._ended_early(call, grace_over.result())))
            else:
                await self._stream_with_heartbeats(call, exchange)
        except asyncio.CancelledError:  # the client left: stop spending upstream work on it
            _cancel(exchange)
            raise
        except Exception:  # a bug of ours: see request()
            _cancel(exchange)
            relay.serve_now(call.flow, RelayJob.whole(_internal_error(call.flow, call.api)))

    async def _stream_with_heartbeats(self, call: _Call, exchange: asyncio.Task) -> None:
        """The client has waited heartbeat_interval with nothing: commit a 200 SSE answer now, and keep it alive
        with heartbeats until the exchange brings a stream to pipe or a failure to report as an error event."""

        record(call.flow)["heartbeats"] = True

        async def stream_or_error() -> LiveStream | bytes | ProxyError:
            outcome, history = await exchange
            last = outcome.last
            call.record(outcome, history, proxy_made=last.stream is None, status=200)
            if last.stream is not None:
                return last.stream
            if last.classification.verdict is Verdict.SUCCESS:
                replay = call.api.whole_as_stream(last.body)  # the upstream ignored "stream": true
                if replay is not None:
                    return replay
            error = failure_in_stream(outcome, call.config.retry, time.time() - call.started)
            return dataclasses.replace(error, message=scrub(error.message, call.secrets))

        await self._relay(call, call.primary, 200, SSE_HEADERS, asyncio.create_task(stream_or_error()), exchange)

    async def _relay(
        self,
        call: _Call,
        target: Route,
        status: int,
        headers: list[tuple[str, str]],
        outcome: asyncio.Future,
        exchange: asyncio.Task | None = None,
        reason: str | None = None,
    ) -> None:
        """Hand the flow to the relay, which sends status and headers, then the stream `outcome` resolves to."""
        flow, streaming = call.flow, call.config.streaming

        def release() -> None:
            for task in (outcome, exchange):
                if task is not None:
                    _cancel(task)

        def report(problem: ProxyError) -> None:
            ending = "Ended the stream with an error event."
            logger.warning(f"{flow.request.method} {target.url}: {problem.message} {ending}")
            record(flow)["stream_error"] = problem.code

        body = client_stream(
            outcome,
            heartbeat_interval=streaming.heartbeat_interval,
            idle_timeout=streaming.idle_timeout,
            api=call.api,
            on_problem=report,
            stop=self.shared.shutdown.grace_over,
        )
        await self.shared.relay.serve(flow, RelayJob(status, headers, body, on_close=release), shown_url=target.url)

    def _log_retry(self, call: _Call, last: UpstreamAttempt, number: int, wait: float) -> None:
        where = last.target.host if last.target else "upstream"
        logger.info(
            f"{call.flow.request.method} {where}: attempt {number} of at most {call.config.retry.max_attempts} "
            f"failed: {scrub(last.classification.detail, call.secrets)}; retrying in {wait:.1f} s"
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


class _ClientGone(Exception):
    pass


class _GraceOver(Exception):
    pass


class _WhileClientWaits:
    """Cancels the block when its client leaves (checked every CLIENT_CHECK_SECONDS) or the shutdown's grace period
    is over, raising _ClientGone or _GraceOver instead. Like asyncio.timeout: a timer on the loop, not a task and a
    wait per request. (A stream's client is watched by the relay: its leaving drops mitmproxy's relay connection.)"""

    def __init__(self, flow: http.HTTPFlow, grace_over: asyncio.Future) -> None:
        self.flow, self.grace_over = flow, grace_over
        self.stopped_by: type[Exception] | None = None

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        self.cancelling = self.task.cancelling()
        self.loop = asyncio.get_running_loop()
        self.timer = self.loop.call_later(CLIENT_CHECK_SECONDS, self._check)
        self.grace_over.add_done_callback(self._grace_over)

    def _check(self) -> None:
        if _client_left(self.flow):
            self._stop(_ClientGone)
        else:
            self.timer = self.loop.call_later(CLIENT_CHECK_SECONDS, self._check)

    def _grace_over(self, _: asyncio.Future) -> None:
        self._stop(_GraceOver)

    def _stop(self, why: type[Exception]) -> None:
        if self.stopped_by is None:
            self.stopped_by = why
            self.task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.timer.cancel()
        self.grace_over.remove_done_callback(self._grace_over)
        # Cancelled by us alone (not by mitmproxy as well): the caller gets why.
        if self.stopped_by and exc_type is asyncio.CancelledError and self.task.uncancel() <= self.cancelling:
            raise self.stopped_by from None


def _cancel(task: asyncio.Future) -> None:
    """Cancel `task`; if it finished just before, close the open upstream stream it left, which nobody will read: the
    stream itself, or an exchange's (outcome, history)."""
    task.cancel()
    if not task.done() or task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if isinstance(result, tuple):
        result = result[0].last.stream
    if isinstance(result, LiveStream):
        result.close()


def _internal_error(flow: http.HTTPFlow, api: Dialect) -> http.Response:
    """The answer to a request a bug of ours broke off; the log says what went wrong."""
    logger.exception(f"{flow.request.method} {flow.request.path}: seaking-proxy failed to handle the request")
    return api.error_response(INTERNAL_ERROR)


def _resolved(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
