"""Graceful shutdown: on SIGINT, SIGTERM or mitmproxy's `q`, requests in flight get server.shutdown_grace seconds.

mitmproxy ends by awaiting every addon's `done` hook, then cancels whatever still runs: live streams would be cut
mid-sentence and waiting clients left with a closed connection. So this addon's `done` — first in the pipeline, before
the addons whose `done` closes the upstream connections and the relay — stops mitmproxy's listeners, refuses what
arrives on connections already open with a 503, and waits until the requests in flight are over or the grace period
has passed. Then the exchanges still waiting answer 503 and live streams end with an error event and `[DONE]` (the
exchange and streaming.py watch `ShutdownSignal.grace_over`, which resolves to that error). Last, it closes the
client connections still open (idle keep-alive ones), so that the process ends without a traceback (see
`_close_client_connections`). A second signal ends the wait at once. The models cache needs nothing: it is written
through on every change.

`done` stays a plain function: a script reload calls it synchronously, where a coroutine function fails. When the
process is ending it returns the drain as an awaitable, which mitmproxy's master awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

from mitmproxy import ctx, http

from seaking.dialects import dialect_of
from seaking.errors import ProxyError
from seaking.flows import is_client_flow

if TYPE_CHECKING:
    from seaking.shared import Shared

logger = logging.getLogger("seaking")

SHUTDOWN_CODE = "proxy_shutdown"
# After the grace period: time for the 503s and final stream events to reach their clients.
LAST_WORDS_SECONDS = 5.0
POLL_SECONDS = 0.05
# After the drain: time for mitmproxy to close the client connections that are still open (keep-alive, idle).
CLOSE_CONNECTIONS_SECONDS = 2.0


def shutdown_error(grace: float | None = None) -> ProxyError:
    """The one error a shutdown gives: to requests that arrive during it (grace None), and to those still waiting
    when the grace period is over."""
    if grace is None:
        message = "seaking-proxy is shutting down and takes no new requests; try again when it is back."
    else:
        message = (
            f"seaking-proxy is shutting down: this request was still under way when the {grace:g} s grace period "
            f"(server.shutdown_grace) ended; the reply is incomplete. Try again when the proxy is back."
        )
    return ProxyError(503, message, SHUTDOWN_CODE, type="api_error", short="seaking-proxy is shutting down")


class ShutdownSignal:
    """What requests in flight watch: `grace_over` resolves (to the error to end them with) when they must end now."""

    def __init__(self) -> None:
        self._grace_over: asyncio.Future[ProxyError] | None = None

    @property
    def grace_over(self) -> asyncio.Future[ProxyError]:
        if self._grace_over is None:  # made on first use, in the running event loop
            self._grace_over = asyncio.get_running_loop().create_future()
        return self._grace_over

    def end_grace(self, error: ProxyError) -> None:
        if not self.grace_over.done():
            self.grace_over.set_result(error)


class GracefulShutdown:
    """mitmproxy addon: knows the client flows in flight; on shutdown lets them finish, for a while."""

    name = "seaking.shutdown"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.signal: ShutdownSignal = shared.shutdown
        self._in_flight: set[str] = set()  # ids of client flows from their request headers to their end
        self.draining = False

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if is_client_flow(flow) and not self.draining:
            self._in_flight.add(flow.id)

    def request(self, flow: http.HTTPFlow) -> None:
        in_flight = flow.id in self._in_flight
        if not self.draining or in_flight or not is_client_flow(flow) or self.shared.records.is_answered(flow):
            return
        # A new request on a connection that was open when the shutdown began.
        self.shared.records.of(flow).refused = SHUTDOWN_CODE
        flow.response = dialect_of(flow.request).error_response(shutdown_error())
        flow.response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._in_flight.discard(flow.id)

    def done(self):
        if not ctx.master.should_exit.is_set():
            return None  # the script is being reloaded or removed; the process goes on
        return self._drain()

    async def _drain(self) -> None:
        self.draining = True
        ctx.options.update(server=False)  # mitmproxy stops listening; open connections stay
        grace = self.shared.snapshot.config.server.shutdown_grace if self.shared.loaded else 0.0
        had_flows_in_flight = bool(self._in_flight)
        if self._in_flight:
            logger.info(
                f"Shutting down: waiting up to {grace:g} s for {len(self._in_flight)} request(s) in flight "
                f"(a second Ctrl-C ends the wait)."
            )
            self._on_second_signal_end_grace(grace)
            await self._until_idle(grace, unless=self.signal.grace_over)
        if self._in_flight:
            logger.warning(
                f"Shutting down: {len(self._in_flight)} request(s) still in flight get a 503, or their stream ends "
                f"with an error event ({SHUTDOWN_CODE})."
            )
            self.signal.end_grace(shutdown_error(grace))
            await self._until_idle(LAST_WORDS_SECONDS)
        if had_flows_in_flight:
            # mitmproxy runs the response hook before it writes the last bytes: give them a moment to leave.
            await asyncio.sleep(0.2)
        await self._close_client_connections()

    async def _close_client_connections(self) -> None:
        """Close the client connections still open (idle keep-alive ones: SillyTavern's, HAProxy's) and wait until
        mitmproxy's handler of each has returned.

        Left open, they are cancelled by asyncio.run() once mitmproxy's master returns. Each runs in the task that
        asyncio.start_server made for mitmproxy's handle_stream (mitmproxy/proxy/mode_servers.py), and on CPython
        3.11.7 and 3.12.1 that task's done callback (asyncio/streams.py, StreamReaderProtocol.connection_made) calls
        task.exception() on the cancelled task, which raises CancelledError inside the callback: the loop prints
        "Exception in callback StreamReaderProtocol.connection_made.<locals>.callback" and a CancelledError
        traceback through handle_stream and handle_client, with or without this addon (CPython gh-113538, fixed in
        later patch releases; mitmproxy issue 6600). So the connections are closed here, the way mitmproxy closes a
        connection itself (its CloseConnection command and the inactivity timeout cancel the connection's reader
        task): mitmproxy logs "client disconnect", runs the client_disconnected hooks, closes the server side, and
        handle_stream returns normally. Nothing is filtered: a real error still prints."""
        proxyserver = ctx.master.addons.get("proxyserver")
        for handler in list(proxyserver.connections.values()):
            io = handler.transports.get(handler.client)
            if io is not None and io.handler is not None:  # None: still in its client_connected hook; ends alone
                handler.close_connection(handler.client)
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_CONNECTIONS_SECONDS
        while proxyserver.connections and loop.time() < until:
            await asyncio.sleep(POLL_SECONDS)

    async def _until_idle(self, seconds: float, unless: asyncio.Future | None = None) -> None:
        """Until no flow is in flight, `seconds` have passed, or `unless` is done."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while self._in_flight and loop.time() < until and not (unless is not None and unless.done()):
            await asyncio.sleep(POLL_SECONDS)

    def _on_second_signal_end_grace(self, grace: float) -> None:
        # mitmproxy's own handlers only set the exit flag, which is set already. Where the loop cannot take signal
        # handlers (Windows, a loop outside the main thread), the grace period runs its course.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
                loop.add_signal_handler(signum, self._second_signal, grace)

    def _second_signal(self, grace: float) -> None:
        logger.warning("Shutting down now: not waiting any longer for the requests in flight.")
        self.signal.end_grace(shutdown_error(grace))
