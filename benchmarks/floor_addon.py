"""The floor of seaking-proxy's design, as a mitmproxy addon of its own: the same path with the addon's work removed.

    mitmdump -s benchmarks/floor_addon.py --mode reverse:<upstream>

It does only what the design cannot do without (docs/how-it-works.md): the upstream exchange with aiohttp from the
request hook, and for a stream the hand-off of the open upstream response to a loopback aiohttp server that mitmproxy
streams from. No retries, classification, routing, keys, records, events or clean endings. bench.py runs it as the
way "floor": what seaking-proxy costs beyond it is the price of its features; what the floor costs beyond plain
mitmdump is the price of owning the exchange (and, for streams, of the relay hop) inside mitmproxy.
"""

from __future__ import annotations

import json
import secrets

import aiohttp
from aiohttp import web
from mitmproxy import http

NOT_SENT = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
NOT_RETURNED = {b"content-length", b"transfer-encoding", b"connection", b"content-encoding"}


class Floor:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.port: int | None = None
        self.jobs: dict[str, aiohttp.ClientResponse] = {}
        self.shown: dict[str, str] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self.port = runner.addresses[0][1]

    async def request(self, flow: http.HTTPFlow) -> None:
        if self.session is None:
            await self.start()
        headers = [(k, v) for k, v in flow.request.headers.items(multi=True) if k.lower() not in NOT_SENT]
        response = await self.session.request(flow.request.method, flow.request.url, headers=headers,
                                              data=flow.request.raw_content or None)
        if _wants_stream(flow.request.raw_content) and response.content_type == "text/event-stream":
            token = secrets.token_urlsafe(16)
            self.jobs[token] = response
            self.shown[flow.id] = flow.request.url
            flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", self.port
            flow.request.headers["x-floor-relay"] = token
            return
        body = await response.read()
        fields = [(k, v) for k, v in response.raw_headers if k.lower() not in NOT_RETURNED]
        flow.response = http.Response(b"HTTP/1.1", response.status, (response.reason or "").encode(),
                                      http.Headers(fields), None, None, 0, 0)
        flow.response.content = body

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        shown = self.shown.pop(flow.id, None)
        if shown is not None:
            flow.request.url = shown
            flow.response.stream = True

    async def relay(self, request: web.Request) -> web.StreamResponse:
        upstream = self.jobs.pop(request.headers.get("x-floor-relay", ""))
        response = web.StreamResponse(status=upstream.status, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        finally:
            upstream.close()
        await response.write_eof()
        return response


def _wants_stream(body: bytes | None) -> bool:
    try:
        return bool(json.loads(body or b"{}").get("stream"))
    except (ValueError, AttributeError):
        return False


addons = [Floor()]
