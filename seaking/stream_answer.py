"""The answer to a "stream": true request: a relay job that owns the request's upstream runs and all they open.

The Exchange hands it to the relay as soon as the first run starts; the relay asks for its head when mitmproxy connects,
streams its body, and closes it once (`aclose`) whatever happened — the stream ended, the client left, the proxy
stopped.

    head  the run ended within heartbeat_interval: its stream's status and headers, or its failure as a whole answer;
          else (or with the shutdown's grace period over) a committed 200 SSE answer
    body  heartbeats while the run still goes on; then the upstream's events, piped (streaming.py) until the stream's
          own end. A stream that breaks off after content — a drop, a silence past idle_timeout, an end without its own
          end, an error event from the upstream — is continued where it broke, if it can be (resume.py): a
          continuation run, heartbeats while it runs, and its events spliced into the same stream (splice.py).
          Otherwise, or when that fails too, the stream ends with exactly one error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mitmproxy import http

from retry_policy import Verdict
from seaking.answers import INTERNAL_ERROR, failure_in_stream, forwardable_headers, internal_error, seaking_headers
from seaking.errors import ProxyError
from seaking.records import AnsweredBy, AttemptRecord, ResumeOutcome, ResumeRecord
from seaking.redaction import scrub
from seaking.relay import Head
from seaking.resume import Continuation, why_not_continued
from seaking.shutdown import ShutdownSignal
from seaking.splice import Splicer, splicer_for
from seaking.sse import parse_event
from seaking.streaming import CONTINUED_AFTER, ClientStream, Pipe, UpstreamStream, read, stream_incomplete
from seaking.upstream_run import UpstreamResult

if TYPE_CHECKING:
    from seaking.exchange import Call

logger = logging.getLogger("seaking")

SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
PREFILL_REFUSED = (400, 422)  # how an upstream refuses a continuation request it cannot take


class StreamAnswer:
    """A relay job (relay.py): the streamed answer to one client request, from its upstream runs."""

    def __init__(self, call: Call, run: asyncio.Task[UpstreamResult], shutdown: ShutdownSignal) -> None:
        self.call = call
        self._runs = [run]  # the request's run, then one per continuation: ours to end
        self._results: dict[asyncio.Task, UpstreamResult] = {}  # taken from the runs once they are over: ours to close
        self._grace_over = shutdown.grace_over
        self._whole: http.Response | None = None  # an answer sent whole instead of a stream
        self._committed = False  # answered 200 with heartbeats before the run ended
        self._continuations = 0  # continuation runs started
        self._relayed: AttemptRecord | None = None  # the record of the attempt whose stream is relayed now
        self.streamed = True
        self.shown_url: str | None = None  # where the answer came from, once known (mitmweb shows it)

    # --- the relay's side ----------------------------------------------------------------------------------------

    async def head(self) -> Head:
        call, run = self.call, self._runs[0]
        try:
            await asyncio.wait({run, self._grace_over}, timeout=self._heartbeat, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                result = self._take(run)
                self.shown_url = call.shown_url(result.last)
                if result.stream is None:
                    return self._answer_whole(call.whole_answer(result))
                last = result.last
                self._relayed = call.note_result(result, AnsweredBy.UPSTREAM, last.status)
                headers = [(name, scrub(value, call.secrets)) for name, value in forwardable_headers(last.raw_headers)]
                headers += seaking_headers(result.outcome).items()
                return Head(last.status, headers, last.reason)
            if self._grace_over.done():
                run.cancel()
                return self._answer_whole(call.ended_early(self._grace_over.result()))
        except Exception:  # a bug of ours: see Exchange.request
            return self._answer_whole(internal_error(call.flow, call.api))
        self._committed = True
        call.record.heartbeats = True
        return Head(200, SSE_HEADERS)

    async def body(self) -> AsyncIterator[bytes]:
        if self._whole is not None:
            yield self._whole.raw_content or b""
            return
        call = self.call
        client = ClientStream(call.api)
        try:
            if self._committed:
                async for chunk in self._until_the_first_run_ends(client):
                    yield chunk
            first = self._results.get(self._runs[0])
            if first is not None and first.stream is not None:
                async for chunk in self._relay(first.stream, client):
                    yield chunk
        except Exception:  # a bug of ours mid-stream: the client still gets one error event and a clean end
            logger.exception(f"{call.flow.request.method} {call.flow.request.path}: seaking-proxy failed mid-stream")
            yield self._end(client, INTERNAL_ERROR)
        finally:
            call.record.reply_chars = client.reply.chars
            call.record.duration = round(time.time() - call.started, 3)

    async def aclose(self) -> None:
        """Whatever happened: every run ends, and every upstream stream they brought (read or not) is closed."""
        for run in self._runs:
            if not run.done():
                run.cancel()
                await asyncio.wait({run})  # a cancelled run closes what it opened
            if run.cancelled() or run in self._results:
                continue
            if run.exception() is not None:  # a bug in the run, and nobody was there to answer for it
                logger.error("seaking-proxy's upstream run failed", exc_info=run.exception())
            else:  # pragma: no cover - a race: it was over before anyone took its result
                self._take(run)
        for result in self._results.values():
            await result.aclose()

    # --- the stream ------------------------------------------------------------------------------------------------

    async def _until_the_first_run_ends(self, client: ClientStream) -> AsyncIterator[bytes]:
        """The client has waited heartbeat_interval with nothing: it gets a heartbeat every heartbeat_interval until
        the run brings a stream to pipe, or a failure to report as an error event."""
        call, api, run = self.call, self.call.api, self._runs[0]
        async for chunk in self._heartbeats_until(run):
            yield chunk
        if not run.done():  # the grace period is over
            yield self._end(client, self._grace_over.result())
            return
        result = self._take(run)
        last = result.last
        self._relayed = call.note_result(result, AnsweredBy.UPSTREAM if result.stream else AnsweredBy.PROXY, 200)
        if result.stream is not None:
            return
        if last.classification.verdict is Verdict.SUCCESS:
            replay = api.whole_as_stream(last.body)  # the upstream ignored "stream": true
            if replay is not None:
                yield replay
                return
        error = failure_in_stream(result, call.config.retry, time.time() - call.started)
        yield self._end(client, dataclasses.replace(error, message=scrub(error.message, call.secrets)))

    async def _relay(self, stream: UpstreamStream, client: ClientStream) -> AsyncIterator[bytes]:
        """The upstream's events to the client, each continuation's spliced in after a break, and one clean end."""
        call, api = self.call, self.call.api
        splicer: Splicer | None = None
        while True:
            pipe = Pipe(stream, call.config.streaming.idle_timeout, self._grace_over)
            held = None  # the upstream's error event after content: held back while the reply may go on
            async for event, facts in pipe:
                if facts.error and client.reply.has_content and self._continuable(client) is None:
                    held = event
                    continue
                if splicer is None:
                    yield client.sent(event.raw, facts)
                else:
                    for raw in splicer.splice(event, facts):
                        yield client.sent(raw, read(api, parse_event(raw)))
            self._count_tokens(stream)
            problem = self._break(pipe, stream, held)
            if problem is None:  # the event that ended it (a finish, [DONE], message_stop) flushed the seam
                break
            # After a break, what the seam holds is the start of a restatement of what the client has: dropped.
            task, resume = self._start_continuation(client, problem) if problem.code in CONTINUED_AFTER else (None, None)
            if task is not None:
                async for chunk in self._heartbeats_until(task):  # the client waits for its reply to go on
                    yield chunk
            continued = self._continued(task, resume) if task is not None else None
            if continued is None:
                if held is not None:
                    yield client.sent(held.raw, read(api, held))  # the upstream's own words on what went wrong
                yield self._end(client, problem)
                return
            stream, splicer = continued, splicer_for(api, client.reply)
        yield self._end(client, None)

    def _break(self, pipe: Pipe, stream: UpstreamStream, held) -> ProxyError | None:
        """Why the upstream's part of the stream ended before the reply was complete; None if it was complete."""
        if stream.reply.complete and not stream.reply.other_choices:
            return None  # a drop or a stall after the finish costs the client nothing but the end, which it gets
        if pipe.problem is not None:
            return pipe.problem
        if held is not None or stream.reply.errors:
            said = scrub((held.data or b"").decode("utf-8", "replace")[:300] if held else "", self.call.secrets)
            return ProxyError(502, f"Upstream reported an error in the middle of the stream: {said}", "stream_upstream_error")
        return stream_incomplete(self.call.api)

    def _count_tokens(self, stream: UpstreamStream) -> None:
        """What the upstream reported of a relayed stream's tokens, on its attempt's record."""
        if self._relayed is not None:
            self._relayed.prompt_tokens = stream.reply.prompt_tokens
            self._relayed.completion_tokens = stream.reply.completion_tokens

    def _end(self, client: ClientStream, problem: ProxyError | None) -> bytes:
        tail, problem = client.ending(problem)
        if problem is not None:
            self._report(problem)
        return tail

    # --- continuing a reply that broke off --------------------------------------------------------------------------

    def _continuable(self, client: ClientStream) -> str | None:
        """Why the client's reply cannot be continued now (None: it can be asked for)."""
        call = self.call
        streaming = call.config.streaming
        if not streaming.resume:
            return "streaming.resume is off"
        if self._continuations >= streaming.resume_attempts:
            return f"{self._continuations} continuation(s) already (streaming.resume_attempts)"
        try:
            request = json.loads(call.upstream_request.body)
        except ValueError:  # pragma: no cover - the endpoints that stream take JSON, which the access guard checked
            return "the request body is not JSON"
        return why_not_continued(request, call.api, client.reply) if isinstance(request, dict) else "not a JSON object"

    def _start_continuation(self, client: ClientStream, problem: ProxyError) -> tuple[asyncio.Task | None, ResumeRecord | None]:
        """Ask the upstream to continue the reply, if it can be: the continuation's run, and the resume's record
        (which says why not, when it cannot be)."""
        call = self.call
        continuation = Continuation(client.reply.text, client.reply.tokens_generated(), len(call.record.resumes) + 1)
        run = call.new_run(dataclasses.replace(call.upstream_request, continuation=continuation))
        if not call.config.streaming.resume or not run.can_start():
            return None, None  # turned off, or no target takes a prefill (prefill: none, or refused before)
        record = ResumeRecord(problem.code, client.reply.chars, ResumeOutcome.NOT_POSSIBLE)
        call.record.resumes.append(record)
        record.detail = self._continuable(client) or ""
        budget = call.snapshot.failover.budget
        if not record.detail and budget is not None and not budget.try_spend():
            record.detail = "the retry budget is spent"
        if record.detail:
            return None, record
        logger.info(f"{call.flow.request.method} {call.primary.url}: {problem.message} Asking the upstream to continue it.")
        task = asyncio.create_task(run.result())
        self._runs.append(task)
        self._continuations += 1
        return task, record

    def _continued(self, task: asyncio.Task, record: ResumeRecord) -> UpstreamStream | None:
        """The continuation's stream, now relayed; None when it failed (recorded, and remembered if refused)."""
        call = self.call
        if not task.done():  # the grace period is over
            record.outcome, record.detail = ResumeOutcome.FAILED, "the proxy is shutting down"
            return None
        result = self._take(task)
        self._relayed = call.note_continuation(result)
        if result.stream is not None:
            record.outcome = ResumeOutcome.CONTINUED
            return result.stream
        last = result.last
        record.outcome, record.detail = ResumeOutcome.FAILED, scrub(last.classification.detail, call.secrets)
        if last.classification.verdict is not Verdict.RETRY and last.status in PREFILL_REFUSED:
            call.snapshot.refused_prefill.add((last.target.base_url, last.model))
            record.outcome = ResumeOutcome.REFUSED
            logger.warning(
                f"{last.target.host} refused a continuation of a reply for {last.model} ({last.status}): "
                "not asked again until the config is reloaded"
            )
        return None

    # --- helpers --------------------------------------------------------------------------------------------------

    @property
    def _heartbeat(self) -> float:
        return self.call.config.streaming.heartbeat_interval

    async def _heartbeats_until(self, run: asyncio.Task) -> AsyncIterator[bytes]:
        """A heartbeat every heartbeat_interval until `run` is over, or the grace period (then the run is cancelled)."""
        while not run.done():
            if self._grace_over.done():
                run.cancel()
                return
            yield self.call.api.heartbeat
            await asyncio.wait({run, self._grace_over}, timeout=self._heartbeat, return_when=asyncio.FIRST_COMPLETED)

    def _take(self, run: asyncio.Task[UpstreamResult]) -> UpstreamResult:
        """A run's result (it must be over), now ours to close."""
        result = self._results[run] = run.result()
        return result

    def _answer_whole(self, response: http.Response) -> Head:
        self._whole, self.streamed = response, False
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in ("content-length", "transfer-encoding")]
        headers.append(("content-length", str(len(response.raw_content or b""))))
        return Head(response.status_code, headers, response.reason)

    def _report(self, problem: ProxyError) -> None:
        flow = self.call.flow
        logger.warning(f"{flow.request.method} {self.call.primary.url}: {problem.message} Ended the stream with an error event.")
        self.call.record.stream_error = problem.code
