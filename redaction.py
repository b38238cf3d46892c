"""Keeping keys out of flows, logs and error messages.

The client's credentials stay on the flow only until the upstream request is built; after that mitmweb and `-w`
recordings show a placeholder. Upstreams sometimes echo the key they rejected, so error text is scrubbed too.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

REDACTED = "[redacted]"
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
# Shorter strings are no secret worth scrubbing and would mangle ordinary text ("Bearer undefined" -> "undefined").
_MIN_SECRET_LENGTH = 8


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_secrets(headers: http.Headers) -> set[str]:
    """Every credential the client sent: when the proxy holds no key, the client's key is the upstream key."""
    found = set()
    for name in CREDENTIAL_HEADERS:
        for value in headers.get_all(name):
            found.update({value.strip(), bearer_token(value)})
    return {s for s in found if len(s) >= _MIN_SECRET_LENGTH and s.lower() != "undefined"}


def redact_headers(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers:
            values = headers.get_all(name)
            headers.set_all(name, [_redacted_value(v) for v in values])


def _redacted_value(value: str) -> str:
    scheme, space, _ = value.partition(" ")
    return f"{scheme} {REDACTED}" if space and scheme.lower() in ("bearer", "basic") else REDACTED


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def scrub_response(response: http.Response, secrets: Iterable[str]) -> None:
    """Remove secrets from an error answer's body and reason phrase before it leaves the proxy."""
    secrets = [s for s in secrets if s]
    if not secrets:
        return
    body = response.get_content(strict=False) or b""
    for secret in secrets:
        body = body.replace(secret.encode(), REDACTED.encode())
    response.content = body
    response.reason = scrub(response.reason, secrets)
