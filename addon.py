"""seaking-proxy: makes a flaky OpenAI-compatible upstream look reliable to SillyTavern.

    mitmdump -s addon.py --mode reverse:https://api.example.com

mitmproxy is the front door (listening, the client side, mitmweb, flow recording); the upstream exchange is ours.
Where things happen:
  - request hook ............ SeakingProxy.request (this file): checks, routing, the exchange, the answer
  - routing ................. routing.py
  - classified and retried .. retry_policy.py (pure), driven per attempt by upstream.py
  - answered ................ answers.py (upstream answers passed on, OpenAI error JSON)
  - /models cache ........... models_cache.py
  - keys kept out of sight .. redaction.py
  - config.yaml ............. config.py
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import mode_specs

from answers import error_response, upstream_error_response, upstream_error_text, upstream_response
from config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from models_cache import ModelsCache, fallback_models_body, is_models_list
from redaction import bearer_token, client_secrets, redact_headers, scrub, scrub_response
from retry_policy import Failure, Outcome, StopReason, Verdict
from routing import Route, route
from upstream import UpstreamAttempt, UpstreamClient, UpstreamRequest, describe_history, upstream_headers

logger = logging.getLogger("seaking")

CACHE_HEADER = "x-seaking-cache"


class SeakingProxy:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.models_cache: ModelsCache | None = None
        self.upstream = UpstreamClient()

    # --- mitmproxy lifecycle -------------------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_config",
            str,
            "",
            f"seaking-proxy config file (YAML or JSON). Default: {DEFAULT_CONFIG_PATH}",
        )

    def configure(self, updated: set[str]) -> None:
        if "seaking_config" in updated or self.config is None:
            self._load_config(ctx.options.seaking_config)
        if updated & {"seaking_config", "listen_host", "mode"}:
            problem = exposure_problem(self.config, ctx.options.listen_host, ctx.options.mode)
            if problem:
                raise exceptions.OptionsError(problem)

    def running(self) -> None:
        # With mitmproxy's default (eager), an unreachable target closes every client connection before any hook
        # runs; we answer everything ourselves, so mitmproxy should connect only when a flow asks it to.
        ctx.options.update(connection_strategy="lazy")

    def done(self) -> None:
        # done must stay synchronous (script reload calls it so); the session closes on the loop.
        try:
            asyncio.get_running_loop().create_task(self.upstream.close())
        except RuntimeError:  # no loop left at interpreter exit
            pass

    def _load_config(self, path: str) -> None:
        try:
            self.config = load_config(path or DEFAULT_CONFIG_PATH)
        except ConfigError as e:
            raise exceptions.OptionsError(f"seaking-proxy config {path or DEFAULT_CONFIG_PATH}: {e}") from None
        self.models_cache = ModelsCache(self.config.models_cache_path)

    # --- hooks ---------------------------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse an oversized body from its Content-Length, before mitmproxy reads it."""
        if not self._owns(flow):
            return
        declared = flow.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.server.max_body_bytes:
            flow.response = self._too_large()

    async def request(self, flow: http.HTTPFlow) -> None:
        if not self._owns(flow) or flow.response is not None:
            return
        secrets = client_secrets(flow.request.headers) | self._configured_secrets()
        try:
            flow.response = await self._answer(flow)
        finally:
            # Sent (or refused): from here on the flow is for people to look at, and must not hold credentials.
            redact_headers(flow.request.headers)
        if flow.response.status_code >= 400:
            scrub_response(flow.response, secrets)

    def _owns(self, flow: http.HTTPFlow) -> bool:
        # A replay from mitmweb's UI is the user's own experiment: mitmproxy sends it as recorded.
        return not flow.is_replay

    # --- answering a request -------------------------------------------------------------------------------------

    async def _answer(self, flow: http.HTTPFlow) -> http.Response:
        config = self.config
        request = flow.request
        refusal = self._check_access(request) or self._check_body(request)
        if refusal:
            return refusal
        target = route(config.target_proxy.url or _reverse_target(request), request.path)
        body = request.raw_content or b""
        if target.expects_json_body and request.method == "POST":
            problem = _json_body_problem(request)
            if problem:
                return error_response(400, problem, "invalid_json", type_="invalid_request_error")
        started = time.time()
        outcome, history = await self.upstream.exchange(
            config.retry,
            UpstreamRequest(
                method=request.method,
                url=target.url,
                headers=upstream_headers(request.headers.items(multi=True), config.target_proxy.api_key),
                body=body,
                expects_json=target.endpoint is not None,
            ),
            on_retry=lambda last, number, wait: self._log_retry(flow, target, last, number, wait),
        )
        elapsed = time.time() - started
        # Show the true upstream in mitmweb and recordings, with how we got the answer.
        request.url = target.url
        answer = self._models_answer(target, outcome) if target.is_models else None
        proxy_made = answer is not None or outcome.last.classification.verdict is Verdict.RETRY
        if answer is None:
            answer = self._final_answer(outcome, elapsed, started)
        self._annotate(flow, history, elapsed, answer, proxy_made)
        return answer

    def _check_access(self, request: http.Request) -> http.Response | None:
        access_key = self.config.server.access_key
        if not access_key:
            return None
        token = bearer_token(request.headers.get("authorization", ""))
        if hmac.compare_digest(token.encode(), access_key.encode()):
            return None
        return error_response(
            401,
            "seaking-proxy: missing or wrong access key. Send 'Authorization: Bearer <server.access_key>' "
            "(in SillyTavern: the API key field of the Custom source).",
            "invalid_access_key",
            type_="authentication_error",
            short="seaking-proxy: missing or wrong access key",
        )

    def _check_body(self, request: http.Request) -> http.Response | None:
        if len(request.raw_content or b"") > self.config.server.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> http.Response:
        limit = self.config.server.max_body_bytes
        return error_response(
            413,
            f"Request body is larger than server.max_body_bytes ({limit} bytes); it was not sent upstream.",
            "request_too_large",
            type_="invalid_request_error",
        )

    def _models_answer(self, target: Route, outcome: Outcome[UpstreamAttempt]) -> http.Response | None:
        """/models: cache a good list; when the upstream is unavailable, answer from the cache or the fallback list."""
        last = outcome.last
        verdict = last.classification.verdict
        if verdict is Verdict.SUCCESS:
            if is_models_list(last.body):
                self.models_cache.put(target.url, last.body)
            return None
        if verdict is not Verdict.RETRY:
            return None  # a 401/404 is not an outage: the user needs to see it, not a stale list
        cached = self.models_cache.get(target.url)
        if cached is not None:
            age = cached.age()
            logger.warning(f"/models: upstream unavailable ({last.classification.detail}); serving the list cached {age} s ago")
            return _json_response(cached.body, {CACHE_HEADER: f"stale; age={age}", "age": str(age)})
        fallback = self.config.models.fallback
        if fallback:
            logger.warning(f"/models: upstream unavailable ({last.classification.detail}); serving models.fallback")
            return _json_response(fallback_models_body(fallback), {CACHE_HEADER: "fallback"})
        return None

    def _final_answer(self, outcome: Outcome[UpstreamAttempt], elapsed: float, started: float) -> http.Response:
        last = outcome.last
        verdict = last.classification.verdict
        if verdict in (Verdict.SUCCESS, Verdict.PASS_THROUGH):
            return upstream_response(last.status, last.reason, last.raw_headers, last.body, started)
        if verdict is Verdict.FAIL_FAST:
            return upstream_error_response(last.status, last.reason, last.raw_headers, last.body, started)
        return self._gave_up(outcome, elapsed)

    def _gave_up(self, outcome: Outcome[UpstreamAttempt], elapsed: float) -> http.Response:
        last = outcome.last
        attempts = outcome.attempts
        tried = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s"
        deadline = self.config.retry.deadline
        if outcome.stopped is StopReason.DEADLINE and last.retry_after is not None:
            wait = math.ceil(outcome.refused_wait or last.retry_after)
            return error_response(
                429,
                f"Upstream is rate limiting (it answered {last.status} and asked to wait {wait} s, which would pass "
                f"the {deadline:g} s deadline); {tried}. Try again in {wait} s.",
                "rate_limited",
                retry_after=wait,
                attempts=attempts,
            )
        if outcome.stopped is StopReason.DEADLINE:
            tried += f" (the {deadline:g} s deadline was reached)"
        failure = last.classification.failure
        detail = last.classification.detail
        if failure is Failure.STATUS:
            upstream_said = upstream_error_text(last.body)
            if upstream_said:
                detail += f" ({upstream_said})"
            retry_after = math.ceil(last.retry_after) if last.retry_after is not None else None
            status, code = last.status, f"upstream_http_{last.status}"
        elif failure is Failure.TIMEOUT:
            detail = f"no response headers from upstream within {self.config.retry.per_try_timeout:g} s"
            status, code, retry_after = 504, "upstream_timeout", None
        elif failure is Failure.BROKEN:
            status, code, retry_after = 502, "upstream_bad_response", None
        else:
            status, code, retry_after = 502, "upstream_unreachable", None
        message = f"{detail[0].upper()}{detail[1:]}; {tried}."
        return error_response(status, message, code, retry_after=retry_after, attempts=attempts)

    # --- what people see: logs and mitmweb -----------------------------------------------------------------------

    def _log_retry(self, flow: http.HTTPFlow, target: Route, last: UpstreamAttempt, number: int, wait: float) -> None:
        detail = scrub(last.classification.detail, self._configured_secrets() | client_secrets(flow.request.headers))
        logger.info(
            f"{flow.request.method} {target.url}: attempt {number}/{self.config.retry.max_attempts} failed: "
            f"{detail}; retrying in {wait:.1f} s"
        )

    def _annotate(
        self, flow: http.HTTPFlow, history: list[UpstreamAttempt], elapsed: float, answer: http.Response, proxy_made: bool
    ) -> None:
        final = f"{answer.status_code} (by seaking-proxy)" if proxy_made else None
        summary = describe_history(history, elapsed, final)
        if len(history) > 1:
            flow.marked = ":repeat:"
        if len(history) > 1 or proxy_made:
            flow.comment = summary
        if len(history) > 1:
            logger.info(f"{flow.request.method} {flow.request.url}: {summary}")

    def _configured_secrets(self) -> set[str]:
        return {k for k in (self.config.target_proxy.api_key, self.config.server.access_key) if k}


def exposure_problem(config: Config, listen_host: str, modes: list[str]) -> str | None:
    """With the key in the proxy and no access key, a proxy reachable from the network spends the key for anyone."""
    if not config.target_proxy.api_key or config.server.access_key:
        return None
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        host = mode.listen_host(listen_host)
        if not _is_loopback(host):
            where = f"on {host}" if host else "on all network interfaces"
            return (
                f"target_proxy.api_key is set but server.access_key is not, and mitmproxy would listen {where}: "
                f"anyone who can reach this port could spend your upstream key. Either listen on loopback only "
                f"(--listen-host 127.0.0.1) or set server.access_key (or the SEAKING_ACCESS_KEY environment variable)."
            )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reverse_target(request: http.Request) -> str:
    """Without target_proxy.url, the --mode reverse target (mitmproxy put it on the request) is the base."""
    default_port = {"http": 80, "https": 443}[request.scheme]
    port = "" if request.port == default_port else f":{request.port}"
    return f"{request.scheme}://{request.host}{port}"


def _json_body_problem(request: http.Request) -> str | None:
    try:
        document = json.loads(request.get_content(strict=False) or b"")
    except ValueError as e:
        return f"Request body is not valid JSON ({e}); it was not sent upstream."
    if not isinstance(document, dict):
        return "Request body must be a JSON object; it was not sent upstream."
    return None


def _json_response(body: bytes, headers: dict[str, str]) -> http.Response:
    return http.Response.make(200, body, {"content-type": "application/json", **headers})


addons = [SeakingProxy()]
