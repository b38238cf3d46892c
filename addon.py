"""seaking-proxy: makes a flaky OpenAI-compatible upstream look reliable to SillyTavern.

    mitmdump -s addon.py --mode reverse:https://api.example.com

mitmproxy is the front door (listening, the client side, mitmweb, flow recording); the upstream exchange is ours.
Where things happen:
  - request hook ............ SeakingProxy.request (this file): checks, routing, the exchange, the answer
  - routing ................. routing.py
  - classified and retried .. retry_policy.py (pure), driven per attempt by upstream.py
  - streamed ................ streaming.py (SSE guarantees), relay.py (the loopback server mitmproxy streams from)
  - answered ................ answers.py (upstream answers passed on, OpenAI error JSON and SSE error events)
  - /models cache ........... models_cache.py
  - keys kept out of sight .. redaction.py
  - config.yaml ............. config.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hmac
import ipaddress
import json
import logging
import time

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import mode_specs

from answers import ProxyError, failure_in_stream, final_answer, forwardable_headers
from config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from models_cache import ModelsCache, fallback_models_body, is_models_list
from redaction import bearer_token, client_secrets, redact_headers, scrub, scrub_response
from relay import Relay, RelayJob
from retry_policy import Outcome, RetryBudget, Verdict
from routing import Route, route
from streaming import LiveStream, client_stream, completion_as_sse
from targets import CircuitBreaker, Target, TargetPool
from upstream import Failover, UpstreamAttempt, UpstreamClient, UpstreamRequest, describe_history

logger = logging.getLogger("seaking")

CACHE_HEADER = "x-seaking-cache"
STATUS_PATH = "/_seaking/status"
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


class SeakingProxy:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.models_cache: ModelsCache | None = None
        self.upstream = UpstreamClient()
        self.relay = Relay()
        # flow.id -> the true upstream URL, while mitmproxy fetches that flow's streaming answer from the relay
        self._relayed: dict[str, str] = {}
        self._records_streamed_bodies = False
        self.failover: Failover | None = None
        self._health_checks: asyncio.Task | None = None

    # --- mitmproxy lifecycle -------------------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "seaking_config",
            str,
            "",
            f"seaking-proxy config file (YAML or JSON). Default: {DEFAULT_CONFIG_PATH}",
        )
        if "store_streamed_bodies" not in loader.master.options:  # mitmproxy 12 has it built in, 11 does not
            loader.add_option(
                "store_streamed_bodies", bool, False, "Keep the bodies of streamed responses in the flow (mitmweb, -w)."
            )
            self._records_streamed_bodies = True

    def configure(self, updated: set[str]) -> None:
        if "seaking_config" in updated or self.config is None:
            self._load_config(ctx.options.seaking_config)
        if updated & {"seaking_config", "mode"} or self.failover is None:
            self.failover = build_failover(self.config, ctx.options.mode)
        if updated & {"seaking_config", "listen_host", "mode"}:
            problem = exposure_problem(self.config, ctx.options.listen_host, ctx.options.mode)
            if problem:
                raise exceptions.OptionsError(problem)

    def running(self) -> None:
        # With mitmproxy's default (eager), an unreachable target closes every client connection before any hook
        # runs; we answer everything ourselves, so mitmproxy should connect only when a flow asks it to.
        ctx.options.update(connection_strategy="lazy")
        self._health_checks = asyncio.get_running_loop().create_task(self._check_health_forever())
        # What is loaded by now (mitmproxy, aiohttp, this addon) lives as long as the process. Freezing it keeps it out
        # of every later full garbage collection, which would otherwise walk it while streams wait: 50-90 ms pauses of
        # the event loop under 100 streams (measured with py-spy and GC callbacks).
        gc.collect()
        gc.freeze()

    def done(self) -> None:
        # done must stay synchronous (script reload calls it so); the sockets close on the loop.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop left at interpreter exit
            return
        if self._health_checks is not None:
            self._health_checks.cancel()
        loop.create_task(self.upstream.close())
        loop.create_task(self.relay.stop())

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
            flow.response = self._too_large().response()

    async def request(self, flow: http.HTTPFlow) -> None:
        if not self._owns(flow) or flow.response is not None:
            return
        secrets = client_secrets(flow.request.headers) | self._configured_secrets()
        try:
            answer = await self._answer(flow, secrets)
        finally:
            # Sent (or refused): from here on the flow is for people to look at, and must not hold credentials.
            redact_headers(flow.request.headers)
        if answer is None:
            return  # a streaming answer: mitmproxy fetches it from the relay
        if answer.status_code >= 400:
            scrub_response(answer, secrets)
        flow.response = answer

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        upstream_url = self._relayed.pop(flow.id, None)
        if upstream_url is None:
            return
        # mitmweb and recordings show the true upstream, not our relay.
        flow.request.url = upstream_url
        record = self._records_streamed_bodies and ctx.options.store_streamed_bodies
        flow.response.stream = StreamedBodyRecorder(flow.response) if record else True

    def error(self, flow: http.HTTPFlow) -> None:
        self._relayed.pop(flow.id, None)

    def _owns(self, flow: http.HTTPFlow) -> bool:
        # A replay from mitmweb's UI is the user's own experiment: mitmproxy sends it as recorded.
        return not flow.is_replay

    # --- answering a request -------------------------------------------------------------------------------------

    async def _answer(self, flow: http.HTTPFlow, secrets: set[str]) -> http.Response | None:
        """The answer for the client, or None when the flow was pointed at the relay for a streaming answer."""
        config = self.config
        request = flow.request
        refusal = self._check_access(request) or self._check_body(request)
        if refusal:
            return refusal.response()
        if request.path == STATUS_PATH and request.method == "GET":
            return _json_response(json.dumps(self.status(), indent=2).encode(), {})
        target = route(self.failover.pool.targets[0].base_url, request.path)  # the endpoint; URLs come per attempt
        document: dict = {}
        if target.expects_json_body and request.method == "POST":
            document, problem = _json_object(request)
            if problem:
                return ProxyError(400, problem, "invalid_json", type="invalid_request_error").response()
        wants_stream = document.get("stream") is True
        model = document.get("model") if isinstance(document.get("model"), str) else None
        started = time.time()
        exchange = asyncio.create_task(
            self.upstream.exchange(
                config.retry,
                UpstreamRequest(
                    method=request.method,
                    path=request.path,
                    headers=list(request.headers.items(multi=True)),
                    body=request.raw_content or b"",
                    expects_json=target.endpoint is not None,
                    model=model,
                    first_event_timeout=config.streaming.first_event_timeout if wants_stream else None,
                ),
                self.failover,
                on_retry=lambda last, number, wait: self._log_retry(request.method, last, number, wait, secrets),
            )
        )
        heartbeat_after = config.streaming.heartbeat_interval if wants_stream else None
        if not await _while_client_waits(flow, exchange, heartbeat_after):
            if _client_left(flow):
                exchange.cancel()  # nobody to answer: stop spending upstream work on it
                flow.kill()
                return None
            await self._stream_with_heartbeats(flow, target, exchange, started, secrets)
            return None
        outcome, history = await exchange
        elapsed = time.time() - started
        last = outcome.last
        target = route(last.target.base_url, request.path)  # where the answer came from
        if last.stream is not None:
            self._annotate(flow, history, elapsed, proxy_made=False)
            headers = forwardable_headers(last.raw_headers) + list(seaking_headers(outcome).items())
            await self._relay(flow, target, last.status, headers, _resolved(last.stream))
            return None
        # Show the true upstream in mitmweb and recordings, with how we got the answer.
        flow.request.url = target.url
        answer = self._models_answer(request.path, outcome) if target.is_models else None
        proxy_made = answer is not None or last.classification.verdict is Verdict.RETRY
        if answer is None:
            answer = final_answer(outcome, config.retry, elapsed, started)
        answer.headers.update(seaking_headers(outcome))
        self._annotate(flow, history, elapsed, proxy_made, answer.status_code)
        return answer

    async def _stream_with_heartbeats(
        self, flow: http.HTTPFlow, target: Route, exchange: asyncio.Task, started: float, secrets: set[str]
    ) -> None:
        """The client has waited heartbeat_interval with nothing: commit a 200 SSE answer now, and keep it alive
        with heartbeats until the exchange brings a stream to pipe or a failure to report as an error event."""

        async def stream_or_error() -> LiveStream | bytes | ProxyError:
            outcome, history = await exchange
            elapsed = time.time() - started
            last = outcome.last
            self._annotate(flow, history, elapsed, proxy_made=last.stream is None)
            if last.stream is not None:
                return last.stream
            if last.classification.verdict is Verdict.SUCCESS:
                replay = completion_as_sse(last.body)  # the upstream ignored "stream": true
                if replay is not None:
                    return replay
            error = failure_in_stream(outcome, self.config.retry, elapsed)
            return dataclasses.replace(error, message=scrub(error.message, secrets))

        await self._relay(flow, target, 200, SSE_HEADERS, asyncio.create_task(stream_or_error()), exchange)

    async def _relay(
        self,
        flow: http.HTTPFlow,
        target: Route,
        status: int,
        headers,
        outcome: asyncio.Future,
        exchange: asyncio.Task | None = None,
    ) -> None:
        """Point the flow at the relay, which sends status and headers, then the stream `outcome` resolves to."""
        streaming = self.config.streaming

        def release() -> None:
            for task in (outcome, exchange):
                if task is not None:
                    task.cancel()
                # What finished just before the cancel may hold an open upstream stream that nobody will read.
                live = _stream_left_in(task)
                if live is not None:
                    live.close()

        def report(problem: ProxyError) -> None:
            logger.warning(f"{flow.request.method} {target.url}: {problem.message} Ended the stream with an error event.")
            ending = f"stream ended by seaking-proxy: {problem.code}"
            flow.comment = f"{flow.comment}; {ending}" if flow.comment else ending

        body = client_stream(
            outcome,
            heartbeat_interval=streaming.heartbeat_interval,
            idle_timeout=streaming.idle_timeout,
            append_done=target.endpoint != "messages",  # Anthropic streams end with message_stop, not [DONE]
            on_problem=report,
        )
        port = await self.relay.start()
        path = self.relay.register(RelayJob(status, headers, body, on_close=release))
        self._relayed[flow.id] = target.url
        flow.request.url = f"http://127.0.0.1:{port}{path}"

    def _check_access(self, request: http.Request) -> ProxyError | None:
        access_key = self.config.server.access_key
        if not access_key:
            return None
        token = bearer_token(request.headers.get("authorization", ""))
        if hmac.compare_digest(token.encode(), access_key.encode()):
            return None
        return ProxyError(
            401,
            "seaking-proxy: missing or wrong access key. Send 'Authorization: Bearer <server.access_key>' "
            "(in SillyTavern: the API key field of the Custom source).",
            "invalid_access_key",
            type="authentication_error",
            short="seaking-proxy: missing or wrong access key",
        )

    def _check_body(self, request: http.Request) -> ProxyError | None:
        if len(request.raw_content or b"") > self.config.server.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ProxyError:
        limit = self.config.server.max_body_bytes
        return ProxyError(
            413,
            f"Request body is larger than server.max_body_bytes ({limit} bytes); it was not sent upstream.",
            "request_too_large",
            type="invalid_request_error",
        )

    def _models_answer(self, path: str, outcome: Outcome[UpstreamAttempt]) -> http.Response | None:
        """/models: cache a good list; when the upstream is unavailable, answer from the cache or the fallback list."""
        last = outcome.last
        verdict = last.classification.verdict
        if verdict is Verdict.SUCCESS:
            if is_models_list(last.body):
                self.models_cache.put(route(last.target.base_url, path).url, last.body)
            return None
        if verdict is not Verdict.RETRY:
            return None  # a 401/404 is not an outage: the user needs to see it, not a stale list
        cached = next(
            (c for t in self.failover.pool.targets if (c := self.models_cache.get(route(t.base_url, path).url))),
            None,
        )
        if cached is not None:
            age = cached.age()
            logger.warning(f"/models: upstream unavailable ({last.classification.detail}); serving the list cached {age} s ago")
            return _json_response(cached.body, {CACHE_HEADER: f"stale; age={age}", "age": str(age)})
        fallback = self.config.models.fallback
        if fallback:
            logger.warning(f"/models: upstream unavailable ({last.classification.detail}); serving models.fallback")
            return _json_response(fallback_models_body(fallback), {CACHE_HEADER: "fallback"})
        return None

    # --- what people see: logs and mitmweb -----------------------------------------------------------------------

    def _log_retry(self, method: str, last: UpstreamAttempt, number: int, wait: float, secrets: set[str]) -> None:
        where = last.target.host if last.target else "upstream"
        logger.info(
            f"{method} {where}: attempt {number} of at most {self.config.retry.max_attempts} failed: "
            f"{scrub(last.classification.detail, secrets)}; retrying in {wait:.1f} s"
        )

    def _annotate(
        self, flow: http.HTTPFlow, history: list[UpstreamAttempt], elapsed: float, proxy_made: bool, status: int = 200
    ) -> None:
        if not history:
            return
        final = f"{status} (by seaking-proxy)" if proxy_made else None
        summary = describe_history(history, elapsed, final)
        if len(history) > 1:
            flow.marked = ":repeat:"
            logger.info(f"{flow.request.method} {flow.request.path}: {summary}")
        if len(history) > 1 or proxy_made:
            flow.comment = summary

    def _configured_secrets(self) -> set[str]:
        keys = [t.api_key for t in self.failover.pool.targets] + [self.config.server.access_key]
        return {k for k in keys if k}

    # --- failover: health and status -----------------------------------------------------------------------------

    async def _check_health_forever(self) -> None:
        """Probe targets whose breaker is open (or that were never used) so that they come back without waiting
        for live traffic to risk a request on them."""
        while True:
            interval = self.config.health_check.interval if self.config else 0
            if interval <= 0:
                await asyncio.sleep(1)
                continue
            doubtful = [t for t in self.failover.pool.targets if t.state != "closed"]
            await asyncio.gather(*(self.upstream.probe(t, self.config.retry) for t in doubtful))
            await asyncio.sleep(interval)

    def status(self) -> dict:
        budget = self.failover.budget
        return {
            "load_balancing": self.failover.pool.strategy,
            "targets": [t.status() for t in self.failover.pool.targets],
            "retry_budget": None if budget is None else {"percent": budget.percent, "min_per_second": budget.min_per_second},
        }

    @command.command("seaking.status")
    def status_command(self) -> str:
        """Each target's state, last error and latency (no secrets)."""
        return json.dumps(self.status(), indent=2)


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


def exposure_problem(config: Config, listen_host: str, modes: list[str]) -> str | None:
    """With the key in the proxy and no access key, a proxy reachable from the network spends the key for anyone."""
    holds_a_key = config.target_proxy.api_key or any(t.api_key for t in config.targets)
    if not holds_a_key or config.server.access_key:
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


def build_failover(config: Config, modes: list[str]) -> Failover:
    primary = config.target_proxy.url or reverse_target(modes)
    if primary is None:
        raise exceptions.OptionsError(
            "seaking-proxy needs an upstream: run mitmproxy with --mode reverse:<url>, or set target_proxy.url"
        )
    breaker = config.circuit_breaker
    sections = [(primary, config.target_proxy.api_key, config.target_proxy.weight)]
    sections += [(t.url, t.api_key, t.weight) for t in config.targets]
    targets = [
        Target(url, api_key, weight, CircuitBreaker(breaker.failure_threshold, breaker.open_seconds))
        for url, api_key, weight in sections
    ]
    budget = RetryBudget(config.retry_budget.percent, config.retry_budget.min_per_second)
    return Failover(TargetPool(targets, config.load_balancing), budget, config.model_fallbacks)


def reverse_target(modes: list[str]) -> str | None:
    """The first --mode reverse:<url> target, as a base URL."""
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.ReverseMode):
            scheme = "https" if mode.scheme in ("https", "http3", "tls", "dtls", "quic") else "http"
            host, port = mode.address
            default = {"http": 80, "https": 443}[scheme]
            netloc = f"[{host}]" if ":" in host else host
            return f"{scheme}://{netloc}" + ("" if port == default else f":{port}")
    return None


def seaking_headers(outcome: Outcome[UpstreamAttempt]) -> dict[str, str]:
    """Where an answer came from: attempts, the target's host (never its URL or key), the model."""
    last = outcome.last
    headers = {"x-seaking-attempts": str(outcome.attempts)}
    if last.target is not None:
        headers["x-seaking-target"] = last.target.host
    if last.model:
        headers["x-seaking-model"] = last.model
    return headers


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_object(request: http.Request) -> tuple[dict, str | None]:
    try:
        document = json.loads(request.get_content(strict=False) or b"")
    except ValueError as e:
        return {}, f"Request body is not valid JSON ({e}); it was not sent upstream."
    if not isinstance(document, dict):
        return {}, "Request body must be a JSON object; it was not sent upstream."
    return document, None


# How often a waiting request checks whether its client is still there. mitmproxy tells no hook that a client left
# while a request is pending (its client_disconnected hook comes only after the flow ends), but marks the connection.
CLIENT_CHECK_SECONDS = 0.25


def _client_left(flow: http.HTTPFlow) -> bool:
    # The client closed its side. HTTP allows a client to half-close after its request, but no LLM client does; one
    # that closes while waiting for its answer has left (a browser tab closed, SillyTavern's Stop button).
    return not flow.client_conn.state & ConnectionState.CAN_READ


async def _while_client_waits(flow: http.HTTPFlow, task: asyncio.Task, timeout: float | None) -> bool:
    """Wait for `task` for at most `timeout` seconds (None: no limit), but no longer than the client stays.
    True when the task is done."""
    loop = asyncio.get_running_loop()
    until = None if timeout is None else loop.time() + timeout
    while not task.done() and not _client_left(flow):
        step = CLIENT_CHECK_SECONDS if until is None else min(CLIENT_CHECK_SECONDS, until - loop.time())
        if step <= 0:
            break
        await asyncio.wait({task}, timeout=step)
    return task.done()


def _stream_left_in(task: asyncio.Future | None) -> LiveStream | None:
    """The open upstream stream a finished task produced: the stream itself, or an exchange's (outcome, history)."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    result = task.result()
    if isinstance(result, tuple):
        result = result[0].last.stream
    return result if isinstance(result, LiveStream) else None


def _resolved(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _json_response(body: bytes, headers: dict[str, str]) -> http.Response:
    return http.Response.make(200, body, {"content-type": "application/json", **headers})


addons = [SeakingProxy()]
