"""Keeping keys out of flows, logs and error messages.

The client's credentials never stay on a flow: `Redaction` takes them off as soon as the request headers arrive and
keeps them in process memory, for that flow's own exchange and for a replay of it from mitmweb in the same process, so
mitmweb, `-w` recordings and `flow_detail` logs show a placeholder. Upstreams sometimes echo the key they rejected, so
error text is scrubbed too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from mitmproxy import http

from seaking.flows import flows_are_listed, is_client_flow

REDACTED = "[redacted]"
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
# Shorter strings are no secret worth scrubbing and would mangle ordinary text ("Bearer undefined" -> "undefined").
_MIN_SECRET_LENGTH = 8
# Keys are kept after their flow is over, so that mitmweb's Replay of it works; the oldest go first.
KEPT_FLOWS = 10_000


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_secrets(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Every credential the client sent: when the proxy holds no key, the client's key is the upstream key."""
    found = set()
    for name, value in headers:
        if name.lower() in CREDENTIAL_HEADERS:
            found.update({value.strip(), bearer_token(value)})
    return {s for s in found if len(s) >= _MIN_SECRET_LENGTH and s.lower() != "undefined"}


def redacted(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A header list with its credentials replaced by the placeholder."""
    return [(k, _redacted_value(v) if k.lower() in CREDENTIAL_HEADERS else v) for k, v in headers]


def is_redacted(value: str) -> bool:
    """A credential header value that is the placeholder, not a key (a flow from a recording, or replayed)."""
    return value == _redacted_value(value)


def _redacted_value(value: str) -> str:
    scheme, space, _ = value.partition(" ")
    return f"{scheme} {REDACTED}" if space and scheme.lower() in ("bearer", "basic") else REDACTED


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def scrub_response(response: http.Response, secrets: Iterable[str]) -> None:
    """Remove secrets from an error answer's body, reason phrase and headers before it leaves the proxy."""
    secrets = [s for s in secrets if s]
    if not secrets:
        return
    body = response.get_content(strict=False) or b""
    for secret in secrets:
        body = body.replace(secret.encode(), REDACTED.encode())
    response.content = body
    response.reason = scrub(response.reason, secrets)
    for name, value in list(response.headers.items(multi=True)):
        if scrub(value, secrets) != value:
            response.headers[name] = scrub(value, secrets)


class Redaction:
    """mitmproxy addon: the client's credentials, off the flow and in process memory only.

    Where flows are listed (mitmweb, the console) they stay there after the flow is over (for the last KEPT_FLOWS
    flows), so that a Replay of a flow sends the key its client sent; elsewhere they go with their flow. A replayed flow carries the placeholder, and keeps the key it had; a key typed into the
    flow's headers in mitmweb before the replay replaces it."""

    name = "seaking.redaction"

    def __init__(self) -> None:
        self._kept: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()  # flow.id -> its credential headers

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not is_client_flow(flow):
            return
        headers = flow.request.headers
        sent = [
            (name, value)
            for name, value in headers.items(multi=True)
            if name.lower() in CREDENTIAL_HEADERS and not is_redacted(value)
        ]
        if sent:
            self._kept[flow.id] = sent
            self._kept.move_to_end(flow.id)
            while len(self._kept) > KEPT_FLOWS:
                self._kept.popitem(last=False)
            for name in {name.lower() for name, _ in sent}:
                headers.set_all(name, [_redacted_value(v) for v in headers.get_all(name)])

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget_unless_replayable(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget_unless_replayable(flow)

    def _forget_unless_replayable(self, flow: http.HTTPFlow) -> None:
        # Without a flow list (plain mitmdump) nothing can be replayed: the key need not outlive its flow.
        if not flows_are_listed():
            self._kept.pop(flow.id, None)

    def client_headers(self, flow: http.HTTPFlow) -> list[tuple[str, str]]:
        """The flow's request headers with the credentials the client sent."""
        kept: dict[str, list[str]] = {}
        for name, value in self._kept.get(flow.id, ()):
            kept.setdefault(name.lower(), []).append(value)
        return [
            (name, kept[name.lower()].pop(0) if kept.get(name.lower()) else value)
            for name, value in flow.request.headers.items(multi=True)
        ]

    def client_secrets(self, flow: http.HTTPFlow) -> set[str]:
        return client_secrets(self._kept.get(flow.id, ()))

    def missing_credentials(self, flow: http.HTTPFlow) -> list[str]:
        """Credential headers of the flow that hold only the placeholder: their key is not in this process."""
        headers = self.client_headers(flow)
        return [name for name, value in headers if name.lower() in CREDENTIAL_HEADERS and is_redacted(value)]
