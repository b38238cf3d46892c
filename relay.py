"""A loopback HTTP server inside the proxy process that mitmproxy streams responses from.

mitmproxy streams only what it reads from a server connection: a response set by an addon is sent whole, and after an
upstream drop nothing more can be written to the client. So for a streaming answer the request hook registers a job
here and points the flow at http://127.0.0.1:<relay port>/<token>; mitmproxy connects, and the job's body — the
upstream's stream plus whatever ends it cleanly — flows through mitmproxy to the client chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

logger = logging.getLogger("seaking")

# mitmproxy connects within milliseconds; a job still waiting after this was abandoned (the client left).
PICKUP_SECONDS = 30.0


@dataclass
class RelayJob:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    on_close: Callable[[], None] = lambda: None  # frees what the body holds: the upstream response, the exchange
    _expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        try:
            await self.body.aclose()
        finally:
            self.on_close()


class Relay:
    def __init__(self) -> None:
        self._jobs: dict[str, RelayJob] = {}
        self._runner: web.AppRunner | None = None
        self._starting: asyncio.Lock | None = None
        self.port: int | None = None

    @property
    def pending(self) -> int:
        return len(self._jobs)

    async def start(self) -> int:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._runner is None:
                app = web.Application()
                app.router.add_route("*", "/relay/{token}", self._handle)
                # handler_cancellation: when mitmproxy drops the connection (the client left), the handler is
                # cancelled at once, which closes the upstream response instead of reading it for nobody.
                runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self._runner = runner
                self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        for token in list(self._jobs):
            await self._jobs.pop(token).close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, job: RelayJob) -> str:
        """Returns the path (with a one-time token) that serves `job`."""
        token = secrets.token_urlsafe(16)
        self._jobs[token] = job
        job._expiry = asyncio.get_running_loop().call_later(PICKUP_SECONDS, self._expire, token)
        return f"/relay/{token}"

    def _expire(self, token: str) -> None:
        job = self._jobs.pop(token, None)
        if job is not None:
            logger.info("a streaming answer was never collected (the client left); closing its upstream")
            asyncio.get_running_loop().create_task(job.close())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        job = self._jobs.pop(request.match_info["token"], None)
        if job is None:
            return web.Response(status=404, text="unknown or used relay token")
        try:
            response = web.StreamResponse(status=job.status, headers=job.headers)
            await response.prepare(request)
            async for chunk in job.body:
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            await job.close()

