"""The loopback relay: answers that mitmproxy cannot be given as `flow.response`, served over a server connection.

mitmproxy streams only what it reads from a server connection: a response set by an addon is sent whole, and after an
upstream drop nothing more can be written to the client. And once a flow's request body streams (which is the only
way not to hold a body mitmproxy should not keep), its answer must come from a server too. So such a flow is *bound*
to this small aiohttp server on 127.0.0.1: its host and port point here and a header carries a one-time token (the
path stays the client's, for the addons that read it); mitmproxy connects, and the job served under that token — an
upstream stream plus whatever ends it cleanly, or a whole answer — flows through mitmproxy to the client chunk by
chunk. mitmweb and recordings show the true upstream URL again from responseheaders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web
from mitmproxy import ctx, http

from seaking.flows import show_upstream

logger = logging.getLogger("seaking")

# mitmproxy connects within milliseconds; a job still waiting after this was abandoned (the client left).
PICKUP_SECONDS = 30.0
TOKEN_HEADER = "x-seaking-relay"
# Describe the body of the hop to the relay, which never receives one: the body stays with mitmproxy (or nowhere).
_BODY_FRAMING = ("content-length", "transfer-encoding")


@dataclass
class RelayJob:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    on_close: Callable[[], None] = lambda: None  # frees what the body holds: the upstream response, the exchange
    reason: str | None = None
    streamed: bool = True  # False: a whole answer, which mitmproxy may read in full before sending it on
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @classmethod
    def whole(cls, response: http.Response) -> RelayJob:
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in _BODY_FRAMING]
        headers.append(("content-length", str(len(response.raw_content or b""))))
        return cls(response.status_code, headers, _once(response.raw_content or b""), reason=response.reason, streamed=False)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        try:
            await self.body.aclose()
        finally:
            self.on_close()


@dataclass
class _Binding:
    token: str
    relay_url: str
    shown_url: str  # what mitmweb and recordings show: the true upstream, not the relay
    request_body: bytes | None = None  # kept off the hop to the relay, shown again with the response
    request_framing: list[tuple[str, str]] = field(default_factory=list)
    streamed: bool = True


class Relay:
    """The relay server, and the mitmproxy addon that binds flows to it and shows their true URL again."""

    name = "seaking.relay"

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Future[RelayJob]] = {}  # token -> the job, once served
        self._bindings: dict[str, _Binding] = {}  # flow.id -> its binding, until mitmproxy has the response headers
        self._runner: web.AppRunner | None = None
        self._starting: asyncio.Lock | None = None
        self.port: int | None = None
        self.records_streamed_bodies = False  # mitmproxy 11 lacks store_streamed_bodies; Settings provides it

    @property
    def pending(self) -> int:
        """Jobs and bindings that mitmproxy has not collected yet."""
        return len(self._slots)

    @property
    def bound(self) -> int:
        return len(self._bindings)

    # --- for the other addons ----------------------------------------------------------------------------------

    async def bind(
        self, flow: http.HTTPFlow, shown_url: str | None = None, on_abandoned: Callable[[], None] | None = None
    ) -> None:
        """Point `flow` at a fresh relay slot. Its answer will be whatever `serve` puts there. `on_abandoned` is
        called if the slot goes before anything was served (mitmproxy dropped its connection: the client left).

        The relay needs nothing of the request body, which mitmproxy would otherwise send it in full (a long
        SillyTavern prompt is hundreds of KiB): the hop's request has no body and no framing headers. From
        requestheaders, the caller also sets `flow.request.stream` to a callable that forwards nothing, and the
        framing headers stay removed (mitmproxy frames the end of the body by them until the client has sent it all).
        From the request hook, the body is already read: it is taken off for the hop and shown again with the
        response."""
        bound = self._bindings.get(flow.id)
        if bound is not None:  # from requestheaders (a chunked body): the same slot, now with its answer's URL
            bound.shown_url = shown_url or bound.shown_url
            self._when_abandoned(bound.token, on_abandoned)
            return
        port = await self.start()
        token = secrets.token_urlsafe(16)
        self._slots[token] = asyncio.get_running_loop().create_future()
        self._when_abandoned(token, on_abandoned)
        request = flow.request
        binding = _Binding(token, "", shown_url or request.url)
        if not request.stream:
            binding.request_body = request.raw_content
            binding.request_framing = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() in _BODY_FRAMING]
            request.raw_content = b""
        for name in _BODY_FRAMING:
            request.headers.pop(name, None)
        request.scheme, request.host, request.port = "http", "127.0.0.1", port
        request.headers[TOKEN_HEADER] = token
        binding.relay_url = request.url
        self._bindings[flow.id] = binding

    def _when_abandoned(self, token: str, callback: Callable[[], None] | None) -> None:
        slot = self._slots.get(token)
        if callback is not None and slot is not None:
            slot.add_done_callback(lambda done: callback() if done.cancelled() else None)

    async def serve(self, flow: http.HTTPFlow, job: RelayJob, shown_url: str | None = None) -> None:
        """`job` is the answer to `flow`, which is bound to the relay now if it is not yet."""
        if flow.id not in self._bindings:
            await self.bind(flow, shown_url)
        if shown_url is not None:
            self._bindings[flow.id].shown_url = shown_url
        self.serve_now(flow, job)

    def serve_now(self, flow: http.HTTPFlow, job: RelayJob) -> None:
        """`serve` for a flow already bound, from code that cannot wait (a request body stream callable)."""
        binding = self._bindings.get(flow.id)
        if binding is None:  # the flow is over
            asyncio.get_running_loop().create_task(job.close())
            return
        binding.streamed = job.streamed
        self._fill(binding.token, job)

    def register(self, job: RelayJob) -> str:
        """A job on its own (no flow): the one-time token (sent as TOKEN_HEADER) that serves it."""
        token = secrets.token_urlsafe(16)
        self._slots[token] = asyncio.get_running_loop().create_future()
        self._fill(token, job)
        return token

    def _fill(self, token: str, job: RelayJob) -> None:
        slot = self._slots.get(token)
        if slot is None or slot.done():  # its connection is gone, or it was answered already
            asyncio.get_running_loop().create_task(job.close())
            return
        slot.set_result(job)
        job._expiry = asyncio.get_running_loop().call_later(PICKUP_SECONDS, self._expire, token)

    def _expire(self, token: str) -> None:
        slot = self._slots.pop(token, None)
        if slot is not None and slot.done() and not slot.cancelled():
            logger.info("a relayed answer was never collected (the client left); closing it")
            asyncio.get_running_loop().create_task(slot.result().close())

    def _release(self, token: str) -> None:
        slot = self._slots.pop(token, None)
        if slot is None:
            return
        if slot.done() and not slot.cancelled():
            asyncio.get_running_loop().create_task(slot.result().close())
        else:
            slot.cancel()

    # --- mitmproxy hooks ---------------------------------------------------------------------------------------

    def running(self) -> None:
        asyncio.get_running_loop().create_task(self.start())  # ready before the first flow needs it

    def done(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop left at interpreter exit
            asyncio.get_running_loop().create_task(self.stop())

    def request(self, flow: http.HTTPFlow) -> None:
        # Last in the pipeline: a whole answer for a flow bound before its body was read can only come through here.
        binding = self._bindings.get(flow.id)
        if flow.response is not None and binding is not None:
            if flow.request.url != binding.relay_url:  # an addon showed where the answer came from
                binding.shown_url = flow.request.url
            self.serve_now(flow, RelayJob.whole(flow.response))
            flow.response = None  # mitmproxy takes the relay's answer; one set here would be overwritten anyway

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        binding = self._bindings.pop(flow.id, None)
        if binding is None:
            return
        _show_request(flow, binding)
        if not binding.streamed:
            return
        record = self.records_streamed_bodies and ctx.options.store_streamed_bodies
        flow.response.stream = StreamedBodyRecorder(flow.response) if record else True

    def error(self, flow: http.HTTPFlow) -> None:
        binding = self._bindings.pop(flow.id, None)
        if binding is not None:
            _show_request(flow, binding)
            self._release(binding.token)

    # --- the server --------------------------------------------------------------------------------------------

    async def start(self) -> int:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._runner is None:
                app = web.Application()
                app.router.add_route("*", "/{path:.*}", self._handle)
                # handler_cancellation: when mitmproxy drops the connection (the client left), the handler is
                # cancelled at once, which closes the upstream response instead of reading it for nobody.
                runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
                await runner.setup()
                # A burst of streams connects here all at once; a short listen queue (aiohttp's default is 128)
                # overflows, and mitmproxy then answers "502 server closed connection". The kernel caps it at
                # net.core.somaxconn.
                site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
                await site.start()
                self._runner = runner
                self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        for token in list(self._slots):
            self._release(token)
        self._bindings.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get(TOKEN_HEADER, "")
        slot = self._slots.get(token)
        if slot is None:
            return web.Response(status=404, text="unknown or used relay token")
        try:
            job = await slot  # at once for a served job; for a flow bound early, when its answer is known
        except asyncio.CancelledError:
            self._release(token)  # mitmproxy left: nobody will collect what is served later
            raise
        self._slots.pop(token, None)
        if job._expiry is not None:
            job._expiry.cancel()
        try:
            response = web.StreamResponse(status=job.status, reason=job.reason, headers=job.headers)
            await response.prepare(request)
            async for chunk in job.body:
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            await job.close()


def _show_request(flow: http.HTTPFlow, binding: _Binding) -> None:
    """The request as the client sent it again, for mitmweb and recordings: the upstream's URL, the body."""
    show_upstream(flow, binding.shown_url)
    flow.request.headers.pop(TOKEN_HEADER, None)
    if binding.request_body is not None:
        flow.request.raw_content = binding.request_body
        for name, value in binding.request_framing:
            flow.request.headers.add(name, value)


class StreamedBodyRecorder:
    """A response.stream callable that passes chunks on unchanged and keeps them for the flow (mitmproxy 11)."""

    def __init__(self, response: http.Response) -> None:
        self.response = response
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.chunks.append(chunk)
        else:  # the end of the body
            self.response.raw_content = b"".join(self.chunks)
        return chunk


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
