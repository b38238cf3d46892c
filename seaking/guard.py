"""Refusing what must not reach the upstream, before it costs anything.

Like mitmproxy's proxyauth, the guard acts in requestheaders: a wrong access key, or a Content-Length over
server.max_body_bytes, is answered at once and the body is never held. (An answer set on the flow there would only be
sent after mitmproxy had buffered the whole body, so the refusal goes out through the relay while the body streams
into nothing.) A body whose length is not declared (chunked) is collected up to the limit and cut off there. Whether a
body is a JSON object is checked in the request hook, once it is complete.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING

from mitmproxy import http

from seaking.dialects import dialect_of
from seaking.errors import ProxyError
from seaking.flows import is_client_flow, is_replay
from seaking.redaction import bearer_token
from seaking.relay import WholeAnswer
from seaking.routing import route

if TYPE_CHECKING:
    from seaking.shared import Shared


class AccessGuard:
    """mitmproxy addon: access key and body size from the headers, a JSON body from the request."""

    name = "seaking.guard"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow):
            return
        # A replay comes from whoever runs mitmweb, not from the network: the access key is for clients.
        refusal = (None if is_replay(flow) else self._check_access(flow)) or self._check_declared_size(flow.request)
        if refusal is not None:
            flow.request.headers.pop("expect", None)  # no "100 Continue": the client need not send the body at all
            flow.request.stream = _discard  # what it sends anyway is read and dropped, so that it can read the answer
            self.shared.records.of(flow).refused = refusal.code
            await self.shared.relay.serve(flow, WholeAnswer(dialect_of(flow.request).error_response(refusal)))
        elif _length_undeclared(flow.request):
            flow.request.stream = CappedBody(self._max_body_bytes(), lambda: self._cut_off(flow))
            await self.shared.relay.bind(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow) or self.shared.records.is_answered(flow):
            return
        if isinstance(flow.request.stream, CappedBody):
            flow.request.raw_content = flow.request.stream.collected()
        problem = self._check_size(flow.request) or self._read_json_body(flow)
        if problem is not None:
            flow.response = dialect_of(flow.request).error_response(problem)

    def _cut_off(self, flow: http.HTTPFlow) -> None:
        self.shared.records.of(flow).refused = "request_too_large"
        self.shared.relay.serve_now(flow, WholeAnswer(dialect_of(flow.request).error_response(self._too_large())))

    def _check_access(self, flow: http.HTTPFlow) -> ProxyError | None:
        access_key = self.shared.snapshot.config.server.access_key
        if not access_key:
            return None
        # As a Bearer token (OpenAI's clients), or as x-api-key (Anthropic's: SillyTavern's Claude source sends its
        # proxy password only there).
        offered = [bearer_token(v) if k.lower() == "authorization" else v.strip()
                   for k, v in self.shared.redaction.client_headers(flow) if k.lower() in ("authorization", "x-api-key")]
        if any(hmac.compare_digest(key.encode(), access_key.encode()) for key in offered):
            return None
        return ProxyError(
            401,
            "seaking-proxy: missing or wrong access key. Send 'Authorization: Bearer <server.access_key>' or "
            "'x-api-key: <server.access_key>' (in SillyTavern: the API key field of the Custom source, or the proxy "
            "password of the Claude source).",
            "invalid_access_key",
            type="authentication_error",
            short="seaking-proxy: missing or wrong access key",
        )

    def _check_declared_size(self, request: http.Request) -> ProxyError | None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes():
            return self._too_large()
        return None

    def _check_size(self, request: http.Request) -> ProxyError | None:
        if len(request.raw_content or b"") > self._max_body_bytes():
            return self._too_large()  # pragma: no cover - grew since its headers: edited in mitmweb while intercepted
        return None

    def _max_body_bytes(self) -> int:
        return self.shared.snapshot.config.server.max_body_bytes

    def _too_large(self) -> ProxyError:
        limit = self._max_body_bytes()
        return ProxyError(
            413,
            f"Request body is larger than server.max_body_bytes ({limit} bytes); it was not sent upstream.",
            "request_too_large",
            type="invalid_request_error",
        )

    def _read_json_body(self, flow: http.HTTPFlow) -> ProxyError | None:
        """A JSON endpoint's POST body must be a JSON object; what the exchange needs of it goes into the record."""
        request = flow.request
        if request.method != "POST" or not route(self.shared.snapshot.failover.targets[0].base_url, request.path).expects_json_body:
            return None
        try:
            document = json.loads(request.get_content(strict=False) or b"")
        except ValueError as e:
            problem = f"Request body is not valid JSON ({e}); it was not sent upstream."
        else:
            if isinstance(document, dict):
                model = document.get("model")
                record = self.shared.records.of(flow)
                record.model, record.stream = model if isinstance(model, str) else None, document.get("stream") is True
                return None
            problem = "Request body must be a JSON object; it was not sent upstream."
        return ProxyError(400, problem, "invalid_json", type="invalid_request_error")


class CappedBody:
    """A request body stream callable that keeps the body up to `limit` bytes and forwards nothing (the flow is bound
    to the relay). Past the limit it lets go of what it kept, calls `on_over` once and drops the rest."""

    def __init__(self, limit: int, on_over) -> None:
        self.limit = limit
        self.on_over = on_over
        self.size = 0
        self._chunks: list[bytes] | None = []

    def __call__(self, chunk: bytes) -> list[bytes]:
        self.size += len(chunk)
        if self._chunks is not None:
            if self.size <= self.limit:
                self._chunks.append(chunk)
            else:
                self._chunks = None
                self.on_over()
        return []

    def collected(self) -> bytes:
        return b"".join(self._chunks or ())


def _discard(chunk: bytes) -> list[bytes]:
    return []


def _length_undeclared(request: http.Request) -> bool:
    """A body is coming whose length is not declared: chunked on HTTP/1, or any body on HTTP/2 and 3 without one."""
    if "content-length" in request.headers:
        return False
    multiplexed = request.is_http2 or request.is_http3
    return "transfer-encoding" in request.headers or (multiplexed and request.method in ("POST", "PUT", "PATCH"))
