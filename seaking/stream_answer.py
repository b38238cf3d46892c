"""The answer to a "stream": true request: a relay job that owns the request's upstream run and everything it opens.

The Exchange hands it to the relay as soon as the run starts; the relay asks for its head when mitmproxy connects,
streams its body, and closes it once (`aclose`) whatever happened — the stream ended, the client left, the proxy stopped.

    head  the run ended within heartbeat_interval: its stream's status and headers, or its failure as a whole answer;
          else (or with the shutdown's grace period over) a committed 200 SSE answer
    body  heartbeats while the run still goes on; then the upstream's events, piped (streaming.py) until the stream's
          own end, or ended by exactly one error event; or a failure as that error event
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mitmproxy import http

from retry_policy import Verdict
from seaking.answers import INTERNAL_ERROR, failure_in_stream, forwardable_headers, internal_error, seaking_headers
from seaking.errors import ProxyError
from seaking.records import AnsweredBy
from seaking.redaction import scrub
from seaking.relay import Head
from seaking.shutdown import ShutdownSignal
from seaking.streaming import pipe
from seaking.upstream_run import UpstreamResult

if TYPE_CHECKING:
    from seaking.exchange import Call

logger = logging.getLogger("seaking")

SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


class StreamAnswer:
    """A relay job (relay.py): the streamed answer to one client request, from its upstream run."""

    def __init__(self, call: Call, run: asyncio.Task[UpstreamResult], shutdown: ShutdownSignal) -> None:
        self.call = call
        self._run = run
        self._grace_over = shutdown.grace_over
        self._result: UpstreamResult | None = None  # taken from the run once it is over: then ours to close
        self._whole: http.Response | None = None  # an answer sent whole instead of a stream
        self._committed = False  # answered 200 with heartbeats before the run ended
        self.streamed = True
        self.shown_url: str | None = None  # where the answer came from, once known (mitmweb shows it)

    async def head(self) -> Head:
        call = self.call
        try:
            await asyncio.wait(
                {self._run, self._grace_over},
                timeout=call.config.streaming.heartbeat_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._run.done():
                result = self._take_result()
                self.shown_url = call.shown_url(result.last)
                if result.stream is None:
                    return self._answer_whole(call.whole_answer(result))
                last = result.last
                call.note_result(result, AnsweredBy.UPSTREAM, last.status)
                headers = forwardable_headers(last.raw_headers) + list(seaking_headers(result.outcome).items())
                return Head(last.status, headers, last.reason)
            if self._grace_over.done():
                self._run.cancel()
                return self._answer_whole(call.ended_early(self._grace_over.result()))
        except Exception:  # a bug of ours: see Exchange.request
            return self._answer_whole(internal_error(call.flow, call.api))
        self._committed = True
        call.record.heartbeats = True
        return Head(200, SSE_HEADERS)

    def _answer_whole(self, response: http.Response) -> Head:
        self._whole, self.streamed = response, False
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in ("content-length", "transfer-encoding")]
        headers.append(("content-length", str(len(response.raw_content or b""))))
        return Head(response.status_code, headers, response.reason)

    async def body(self) -> AsyncIterator[bytes]:
        if self._whole is not None:
            yield self._whole.raw_content or b""
            return
        if self._committed:
            async for chunk in self._heartbeats_until_the_run_ends():
                yield chunk
        result = self._result
        if result is None or result.stream is None:
            return
        call, streaming = self.call, self.call.config.streaming
        try:
            async for chunk in pipe(result.stream, streaming.idle_timeout, self._report, self._grace_over):
                yield chunk
        except Exception:  # a bug of ours mid-stream: the client still gets one error event and a clean end
            logger.exception(f"{call.flow.request.method} {call.flow.request.path}: seaking-proxy failed mid-stream")
            tail, _ = result.stream.watcher.ending(INTERNAL_ERROR)
            self._report(INTERNAL_ERROR)
            yield tail
        call.record.reply_chars = result.stream.watcher.reply.chars
        call.record.duration = round(time.time() - call.started, 3)

    async def _heartbeats_until_the_run_ends(self) -> AsyncIterator[bytes]:
        """The client has waited heartbeat_interval with nothing: it gets a heartbeat every heartbeat_interval until
        the run brings a stream to pipe, or a failure to report as an error event."""
        call, api = self.call, self.call.api
        while not self._run.done():
            if self._grace_over.done():
                self._run.cancel()
                error = self._grace_over.result()
                self._report(error)
                yield api.error_event(error) + api.end_of_stream
                return
            yield api.heartbeat
            await asyncio.wait(
                {self._run, self._grace_over},
                timeout=call.config.streaming.heartbeat_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
        result = self._take_result()
        last = result.last
        call.note_result(result, AnsweredBy.UPSTREAM if result.stream else AnsweredBy.PROXY, 200)
        if result.stream is not None:
            return
        if last.classification.verdict is Verdict.SUCCESS:
            replay = api.whole_as_stream(last.body)  # the upstream ignored "stream": true
            if replay is not None:
                yield replay
                return
        error = failure_in_stream(result.outcome, call.config.retry, time.time() - call.started)
        error = dataclasses.replace(error, message=scrub(error.message, call.secrets))
        self._report(error)
        yield api.error_event(error) + api.end_of_stream

    def _take_result(self) -> UpstreamResult:
        """The run's result (it must be over), now ours to close."""
        self._result = self._run.result()
        return self._result

    def _report(self, problem: ProxyError) -> None:
        flow = self.call.flow
        logger.warning(f"{flow.request.method} {self.call.primary.url}: {problem.message} Ended the stream with an error event.")
        self.call.record.stream_error = problem.code

    async def aclose(self) -> None:
        """Whatever happened: the run ends, and the upstream stream it brought (read or not) is closed."""
        run = self._run
        if not run.done():
            run.cancel()
            await asyncio.wait({run})  # a cancelled run closes what it opened
        if self._result is None and not run.cancelled():
            if run.exception() is not None:  # a bug in the run, and nobody was there to answer for it
                logger.error("seaking-proxy's upstream run failed", exc_info=run.exception())
            else:
                self._result = run.result()  # it was over before anyone took its result
        if self._result is not None:
            await self._result.aclose()
