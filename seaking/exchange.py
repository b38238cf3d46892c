"""The Exchange addon, from the request hook: where a client's request is routed upstream and answered.

mitmproxy does not talk to the upstream for the proxy's flows: it has no upstream timeouts and cannot answer the
client after its own attempt failed. So the request hook starts an `UpstreamRun` (upstream_run.py: attempts over
targets and fallback models, classified and retried by retry_policy.py) and answers from its result: a whole answer
is set on the flow (answers.py says what it is). A stream ("stream": true) is handed to the relay at once as a
`StreamAnswer` (stream_answer.py), which owns the run from then on and streams its result to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from retry_policy import Verdict
from seaking.answers import final_answer, internal_error, seaking_headers
from seaking.attempt import Attempt, UpstreamRequest
from seaking.attempt_flows import attempt_records
from seaking.dialects import Dialect, dialect_for, dialect_of
from seaking.errors import ProxyError
from seaking.flows import is_client_flow, is_replay, show_upstream
from seaking.records import AnsweredBy, AttemptRecord, FlowRecord
from seaking.redaction import scrub, scrub_response
from seaking.routing import REPLY_ENDPOINTS, Route, route
from seaking.stream_answer import StreamAnswer
from seaking.streaming import UpstreamStream
from seaking.targets import Target
from seaking.upstream_run import UpstreamResult, UpstreamRun

if TYPE_CHECKING:
    from seaking.shared import Shared, Snapshot

logger = logging.getLogger("seaking")

# How often a waiting request checks whether its client is still there. mitmproxy tells no hook that a client left
# while a request is pending (its client_disconnected hook comes only after the flow ends), but marks the connection.
CLIENT_CHECK_SECONDS = 0.25
@dataclasses.dataclass
class Call:
    """One client request on its way through the exchange: what each step of answering it needs. A config reload
    while it runs changes nothing for it: it keeps the snapshot it began with."""

    flow: http.HTTPFlow
    record: FlowRecord
    snapshot: Snapshot
    primary: Route  # the request routed onto the first target: its endpoint, the URL a committed stream shows
    api: Dialect  # the shape of every error and stream ending the proxy makes for it
    secrets: set[str]  # never to be shown: the client's keys and the proxy's
    upstream_request: UpstreamRequest  # the request as it goes upstream (a continuation is made from it)
    new_run: Callable[[UpstreamRequest], UpstreamRun]  # a run of that, or of a continuation of it
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def config(self):
        return self.snapshot.config

    def shown_url(self, attempt: Attempt) -> str:
        """Where an attempt went, as the client flow shows it (mitmweb, recordings)."""
        return route(attempt.target.base_url, self.record.client_path).url

    def note_result(self, result: UpstreamResult, answered_by: AnsweredBy, status: int) -> AttemptRecord:
        """What the run came to, in the flow's record: for the flow notes, the models cache, metrics and recordings.
        Returns the record of the attempt the answer came from."""
        self.record.attempts = []
        self.record.elapsed = round(time.time() - self.started, 3)
        self.record.verdict = result.last.classification.verdict
        self.record.stopped = result.outcome.stopped
        self.record.answered_by = answered_by
        self.record.status = status
        return self.note_continuation(result)

    def note_continuation(self, result: UpstreamResult) -> AttemptRecord:
        """A run's attempts, after those before it (a continuation's); the record of the one it ended with."""
        records = attempt_records(result.attempts, self.secrets)
        self.record.attempts += records
        return records[result.attempts.index(result.last)]

    def whole_answer(self, result: UpstreamResult) -> http.Response:
        """The answer, when the run ended without a stream to relay."""
        answer = final_answer(result, self.config.retry, time.time() - self.started, self.started, self.api)
        answer.headers.update(seaking_headers(result.outcome))
        if answer.status_code >= 400:
            scrub_response(answer, self.secrets)
        gave_up = result.last.classification.verdict is Verdict.RETRY
        self.note_result(result, AnsweredBy.PROXY if gave_up else AnsweredBy.UPSTREAM, answer.status_code)
        return answer

    def ended_early(self, error: ProxyError) -> http.Response:
        """The proxy is shutting down and this request has had its grace period."""
        self.record.ended_early = error.code
        self.record.answered_by, self.record.status = AnsweredBy.PROXY, error.status
        return self.api.error_response(error)



class Exchange:
    """mitmproxy addon: answers every client flow that no earlier addon answered, from the upstream."""

    name = "seaking.exchange"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def done(self) -> None:
        # done must stay synchronous (a script reload calls it so): the upstream connections close on the loop.
        with contextlib.suppress(RuntimeError):  # no loop left at interpreter exit
            asyncio.get_running_loop().create_task(self.shared.pools.close())

    async def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or self.shared.records.is_answered(flow):
            return
        try:
            call = self._call(flow)
            run = call.new_run(call.upstream_request)
            if call.record.stream:
                # The relay owns the run from here: mitmproxy connects to it while the upstream is still thinking, and
                # a client that leaves drops that connection, which ends the run at once.
                answer = StreamAnswer(call, asyncio.create_task(run.result()), self.shared.shutdown)
                await self.shared.relay.serve(flow, answer, shown_url=call.primary.url)
                return
            answer = await self._whole(call, run)
        except Exception:
            # A bug of ours. Left unanswered, mitmproxy would send the request upstream itself: unretried, with the
            # key placeholder, and its error as an HTML page. The client gets a clear error instead.
            answer = internal_error(flow, dialect_of(flow.request))
        if answer is not None:
            flow.response = answer

    def _call(self, flow: http.HTTPFlow) -> Call:
        snapshot = self.shared.snapshot
        config = snapshot.config
        record = self.shared.records.of(flow)
        request = flow.request
        record.client_path = request.path
        primary = route(snapshot.failover.targets[0].base_url, record.client_path)  # URLs come per attempt
        record.endpoint = primary.endpoint
        secrets = self.shared.redaction.client_secrets(flow) | snapshot.secrets
        api = dialect_for(primary.endpoint, request.headers)
        upstream_request = UpstreamRequest(
            method=request.method,
            path=record.client_path,
            headers=self.shared.redaction.client_headers(flow),
            body=request.raw_content or b"",
            expects_json=primary.endpoint is not None,
            api=api,
            model=record.model,
            first_event_timeout=config.streaming.first_event_timeout if record.stream else None,
            blank=api.is_blank if primary.endpoint in REPLY_ENDPOINTS else None,
        )

        def on_attempt(attempt: Attempt, stream: UpstreamStream | None) -> None:
            self.shared.attempt_flows.note(flow, attempt, stream, secrets)

        def on_retry(last: Attempt, number: int, wait: float) -> None:
            logger.info(
                f"{request.method} {last.target.host}: attempt {number} of at most {config.retry.max_attempts} "
                f"failed: {scrub(last.classification.detail, secrets)}; retrying in {wait:.1f} s"
            )

        def new_run(upstream: UpstreamRequest) -> UpstreamRun:
            def refused(target: Target, model: str | None) -> bool:
                return upstream.continuation is not None and (target.base_url, model) in snapshot.refused_prefill

            # A continuation that adds nothing says the reply was complete when it broke off: no blank reply to retry.
            policy = config.retry if upstream.continuation is None else dataclasses.replace(config.retry, retry_empty=False)
            return UpstreamRun(self.shared.pools, policy, snapshot.failover, upstream, on_attempt, on_retry, refused)

        return Call(flow, record, snapshot, primary, api, secrets, upstream_request, new_run)

    async def _whole(self, call: Call, run: UpstreamRun) -> http.Response | None:
        """The whole answer, or None when the client left (the flow is killed: nobody to answer)."""
        grace_over = self.shared.shutdown.grace_over
        try:
            async with _WhileClientWaits(call.flow, grace_over):
                result = await run.result()  # cancelled, the run spends no more upstream work on the request
        except _ClientGone:
            call.flow.kill()
            return None
        except _GraceOver:
            return call.ended_early(grace_over.result())
        async with contextlib.aclosing(result):
            show_upstream(call.flow, call.shown_url(result.last))  # mitmweb and recordings show the true upstream
            return call.whole_answer(result)


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
