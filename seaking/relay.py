"""The loopback relay: answers that mitmproxy cannot be given as `flow.response`, served over a server connection.

mitmproxy streams only what it reads from a server connection: a response set by an addon is sent whole, and after an
upstream drop nothing more can be written to the client. And once a flow's request body streams (which is the only
way not to hold a body mitmproxy should not keep), its answer must come from a server too. So such a flow is *bound*
to this small aiohttp server on 127.0.0.1: its host and port point here and a header carries a one-time token (the
path stays the client's, for the addons that read it); mitmproxy connects, and the job served under that token — a
stream answer (stream_answer.py) or a whole one — flows through mitmproxy to the client chunk by chunk. mitmweb and
recordings show the true upstream URL again from responseheaders.

A job is handed to the relay once (`serve`); from then on the relay owns it and closes it once, whatever happens: after
its body was sent, when mitmproxy's connection drops (the client left), when it was never collected, or at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from mitmproxy import ctx, http

from seaking.flows import flows_are_seen, show_upstream

logger = logging.getLogger("seaking")

# mitmproxy connects within milliseconds; a job still waiting after this was abandoned (the client left).
PICKUP_SECONDS = 30.0
TOKEN_HEADER = "x-seaking-relay"
# Describe the body of the hop to the relay, which never receives one: the body stays with mitmproxy (or nowhere).
_BODY_FRAMING = ("content-length", "transfer-encoding")
# What a flow keeps of a body streamed to its client, for mitmweb and recordings: the first and the last half of this.
CLIENT_COPY_BYTES = 256 * 1024


@dataclass(frozen=True)
class Head:
    status: int
    headers: list[tuple[str, str]]
    reason: str | None = None


class RelayJob(Protocol):
    """An answer the relay serves: its head (awaited first: it may wait for the upstream), then its body."""

    streamed: bool  # once head() returned: False for a whole answer, which mitmproxy may read in full first
    shown_url: str | None  # once head() returned: where the answer came from, if not where the flow was bound for

    async def head(self) -> Head: ...

    def body(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Free what the job holds (an upstream stream, a run still under way). Called once, by the relay."""


class WholeAnswer:
    """A job for a complete response made by an addon."""

    streamed = False
    shown_url = None

    def __init__(self, response: http.Response) -> None:
        self.response = response

    async def head(self) -> Head:
        response = self.response
        headers = [(k, v) for k, v in response.headers.items(multi=True) if k.lower() not in _BODY_FRAMING]
        headers.append(("content-length", str(len(response.raw_content or b""))))
        return Head(response.status_code, headers, response.reason)

    async def body(self) -> AsyncIterator[bytes]:
        yield self.response.raw_content or b""

    async def aclose(self) -> None:
        pass


@dataclass
class _Slot:
    """A token's place: the job once it is served, until mitmproxy collects it."""

    token: str
    job: asyncio.Future[RelayJob]
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Binding:
    slot: _Slot
    relay_url: str
    shown_url: str  # what mitmweb and recordings show: the true upstream, not the relay
    request_body: bytes | None = None  # kept off the hop to the relay, shown again with the response
    request_framing: list[tuple[str, str]] = field(default_factory=list)
    job: RelayJob | None = None


class Relay:
    """The relay server, and the mitmproxy addon that binds flows to it and shows their true URL again."""

    name = "seaking.relay"

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}  # token -> its slot, until collected
        self._bindings: dict[str, _Binding] = {}  # flow.id -> its binding, until mitmproxy has the response headers
        self._runner: web.AppRunner | None = None
        self._starting: asyncio.Lock | None = None
        self._store_option_is_ours = False  # mitmproxy 11 lacks store_streamed_bodies: we provide it
        self.port: int | None = None

    @property
    def pending(self) -> int:
        """Jobs and bindings that mitmproxy has not collected yet."""
        return len(self._slots)

    @property
    def bound(self) -> int:
        return len(self._bindings)

    # --- for the other addons ----------------------------------------------------------------------------------

    async def bind(self, flow: http.HTTPFlow, shown_url: str | None = None) -> None:
        """Point `flow` at a fresh relay slot. Its answer will be whatever `serve` puts there.

        The relay needs nothing of the request body, which mitmproxy would otherwise send it in full (a long
        SillyTavern prompt is hundreds of KiB): the hop's request has no body and no framing headers. From
        requestheaders, the caller also sets `flow.request.stream` to a callable that forwards nothing, and the
        framing headers stay removed (mitmproxy frames the end of the body by them until the client has sent it all).
        From the request hook, the body is already read: it is taken off for the hop and shown again with the
        response."""
        port = await self.start()
        slot = self._new_slot()
        request = flow.request
        binding = _Binding(slot, "", shown_url or request.url)
        if not request.stream:
            binding.request_body = request.raw_content
            binding.request_framing = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() in _BODY_FRAMING]
            request.raw_content = b""
        for name in _BODY_FRAMING:
            request.headers.pop(name, None)
        request.scheme, request.host, request.port = "http", "127.0.0.1", port
        request.headers[TOKEN_HEADER] = slot.token
        binding.relay_url = request.url
        self._bindings[flow.id] = binding

    async def serve(self, flow: http.HTTPFlow, job: RelayJob, shown_url: str | None = None) -> None:
        """`job` is the answer to `flow` (bound to the relay now if it is not yet); the relay owns it from here."""
        if flow.id not in self._bindings:
            await self.bind(flow, shown_url)
        elif shown_url is not None:
            self._bindings[flow.id].shown_url = shown_url
        self.serve_now(flow, job)

    def serve_now(self, flow: http.HTTPFlow, job: RelayJob) -> None:
        """`serve` for a flow already bound, from code that cannot wait (a request body stream callable)."""
        binding = self._bindings.get(flow.id)
        if binding is None:  # pragma: no cover - a race: the flow ended (its client left) as its answer was decided
            self._close_soon(job)
            return
        binding.job = job
        self._fill(binding.slot, job)

    def register(self, job: RelayJob) -> str:
        """A job on its own (no flow): the one-time token (sent as TOKEN_HEADER) that serves it."""
        slot = self._new_slot()
        self._fill(slot, job)
        return slot.token

    def _new_slot(self) -> _Slot:
        slot = _Slot(secrets.token_urlsafe(16), asyncio.get_running_loop().create_future())
        self._slots[slot.token] = slot
        return slot

    def _fill(self, slot: _Slot, job: RelayJob) -> None:
        if slot.job.done():  # pragma: no cover - a race: its connection went (or it was answered) as it was filled
            self._close_soon(job)
            return
        slot.job.set_result(job)
        slot.expiry = asyncio.get_running_loop().call_later(PICKUP_SECONDS, self._expire, slot.token)

    def _expire(self, token: str) -> None:
        if token in self._slots:
            logger.info("a relayed answer was never collected (the client left); closing it")
            self._release(token)

    def _release(self, token: str) -> None:
        """The slot goes, and the job in it, if any, is closed: nobody will collect it."""
        slot = self._slots.pop(token, None)
        if slot is None:
            return
        if slot.expiry is not None:
            slot.expiry.cancel()
        if slot.job.done():
            self._close_soon(slot.job.result())
        else:
            slot.job.cancel()

    @staticmethod
    def _close_soon(job: RelayJob) -> None:
        asyncio.get_running_loop().create_task(job.aclose())

    # --- mitmproxy hooks ---------------------------------------------------------------------------------------

    def load(self, loader) -> None:
        if "store_streamed_bodies" not in loader.master.options:  # pragma: no cover - mitmproxy 11 (12 has it built in)
            loader.add_option(
                "store_streamed_bodies", bool, False, "Keep the bodies of streamed responses in the flow (mitmweb, -w)."
            )
            self._store_option_is_ours = True

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
            self.serve_now(flow, WholeAnswer(flow.response))
            flow.response = None  # mitmproxy takes the relay's answer; one set here would be overwritten anyway

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        binding = self._bindings.pop(flow.id, None)
        if binding is None:
            return
        if binding.job is not None and binding.job.shown_url:
            binding.shown_url = binding.job.shown_url
        _show_request(flow, binding)
        if binding.job is None or not binding.job.streamed:
            return
        if ctx.options.store_streamed_bodies and self._store_option_is_ours:  # pragma: no cover - mitmproxy 11 only
            flow.response.stream = ClientCopy(flow.response, limit=None)
        elif flows_are_seen() and not ctx.options.store_streamed_bodies:  # (mitmproxy 12 keeps it all itself)
            flow.response.stream = ClientCopy(flow.response, limit=CLIENT_COPY_BYTES)
        else:
            flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        binding = self._bindings.pop(flow.id, None)
        if binding is not None:
            _show_request(flow, binding)
            self._release(binding.slot.token)
        if flow.response is not None and isinstance(flow.response.stream, ClientCopy):
            flow.response.stream.keep()  # the client left mid-stream: keep what it was sent

    # --- the server --------------------------------------------------------------------------------------------

    async def start(self) -> int:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._runner is None:
                app = web.Application()
                app.router.add_route("*", "/{path:.*}", self._handle)
                # handler_cancellation: when mitmproxy drops the connection (the client left), the handler is
                # cancelled at once, which closes the job (and its upstream stream) instead of reading it for nobody.
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
        slot = self._slots.get(request.headers.get(TOKEN_HEADER, ""))
        if slot is None:
            return web.Response(status=404, text="unknown or used relay token")
        try:
            job = await slot.job  # at once for a served job; for a flow bound early, when its answer is known
        except asyncio.CancelledError:
            self._release(slot.token)  # mitmproxy left: nobody will collect what is served later
            raise
        del self._slots[slot.token]  # collected: from here this handler closes the job
        if slot.expiry is not None:
            slot.expiry.cancel()
        try:
            return await _send(request, job)
        finally:
            await job.aclose()


async def _send(request: web.Request, job: RelayJob) -> web.StreamResponse:
    head = await job.head()
    response = web.StreamResponse(status=head.status, reason=head.reason, headers=head.headers)
    try:
        await response.prepare(request)
        async for chunk in job.body():
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one: mitmproxy's side closed (the client left)
        logger.debug(f"{request.method} {request.path}: the client left while its answer was being sent")
    return response


def _show_request(flow: http.HTTPFlow, binding: _Binding) -> None:
    """The request as the client sent it again, for mitmweb and recordings: the upstream's URL, the body."""
    show_upstream(flow, binding.shown_url)
    flow.request.headers.pop(TOKEN_HEADER, None)
    if binding.request_body is not None:
        flow.request.raw_content = binding.request_body
        for name, value in binding.request_framing:
            flow.request.headers.add(name, value)


class ClientCopy:
    """A response.stream callable that passes chunks on unchanged and keeps a copy for the flow: all of it, or with a
    `limit` the first and last halves of it, the bytes between left out with an SSE comment that says so (mitmweb's
    Response tab and recordings then still show the start of the reply and how it ended)."""

    def __init__(self, response: http.Response, limit: int | None) -> None:
        self.response = response
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.left_out = 0

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:  # the end of the body
            self.keep()
        elif self.limit is None or len(self.head) + len(chunk) <= self.limit // 2:
            self.head += chunk
        else:
            room = max(0, self.limit // 2 - len(self.head))
            self.head += chunk[:room]
            self.tail += chunk[room:]
            over = len(self.tail) - self.limit // 2
            if over > 0:
                del self.tail[:over]
                self.left_out += over
        return chunk

    def keep(self) -> None:
        gap = f": ... {self.left_out} bytes not kept by seaking-proxy ...\n\n".encode() if self.left_out else b""
        self.response.raw_content = bytes(self.head) + gap + bytes(self.tail)
