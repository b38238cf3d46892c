"""Claude: Anthropic's Messages API through real mitmproxy, against the fault upstream's Anthropic mode, read with
aiohttp. Sections follow the numbered behaviours of the Claude issue; the SDK and SillyTavern prove the same from
their side (test_anthropic_sdk.py, test_sillytavern.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import pytest

from conftest import CHAT, call, chat
from seaking.lab.fault_upstream import (
    REPLY_TEXT,
    Delayed,
    ErrorBody,
    Hang,
    MessageStream,
    Reset,
    Status,
    Stream,
    anthropic_error,
    message,
)

CLIENT_KEY = "sk-ant-client-key-123456"
UPSTREAM_KEY = "sk-ant-upstream-secret-abcdef"
ACCESS_KEY = "proxy-password-for-claude"
ANTHROPIC_HEADERS = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
STREAM_MESSAGE = {**MESSAGE, "stream": True}


async def messages(client, proxy, body: dict | None = None, path: str = "/v1/messages", headers: dict | None = None, **kwargs):
    return await call(
        client, "POST", proxy.url + path, json=body or MESSAGE, headers={**ANTHROPIC_HEADERS, **(headers or {})}, **kwargs
    )


def assert_anthropic_error(answer, status: int, error_type: str) -> dict:
    """The answer is Anthropic's error shape with this status and type, and tells the SDKs not to retry it."""
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    document = answer.json()
    assert document["type"] == "error" and set(document["error"]) >= {"type", "message"}, document
    assert document["error"]["type"] == error_type, document
    assert answer.headers["x-should-retry"] == "false"
    return document["error"]


@dataclass
class EventStream:
    """An SSE body as named events: (event name, parsed data), with the time each arrived."""

    status: int
    headers: dict
    body: bytes = b""
    events: list[tuple[str, dict]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    ended_cleanly: bool = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(d["delta"].get("text", "") for n, d in self.events if n == "content_block_delta")

    @property
    def errors(self) -> list[dict]:
        return [d["error"] for n, d in self.events if n == "error"]

    @property
    def heartbeats(self) -> int:
        return self.body.count(b": keep-alive\n\n")


async def read_events(client, proxy, body: dict | None = None, path: str = "/v1/messages", timeout: float = 20) -> EventStream:
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        async with client.post(proxy.url + path, json=body or STREAM_MESSAGE, headers=ANTHROPIC_HEADERS) as response:
            read = EventStream(response.status, dict(response.headers))
            name, data = None, []
            async for line in response.content:  # raises ClientPayloadError on a body that did not end cleanly
                read.body += line
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    read.events.append((name, json.loads(b"\n".join(data))))
                    read.times.append(time.monotonic() - started)
                    name, data = None, []
            read.ended_cleanly = True
    return read


def assert_ended_with_one_error(read: EventStream, error_type: str, code: str) -> dict:
    """A committed stream that broke: exactly one `event: error` as its last event, a clean end, no [DONE]."""
    assert (read.status, read.ended_cleanly) == (200, True)
    assert len(read.errors) == 1, read.body
    assert read.names[-1] == "error", read.names
    error = read.errors[0]
    assert (error["type"], error["code"]) == (error_type, code)
    assert b"[DONE]" not in read.body
    assert b'data: {"error"' not in read.body  # no OpenAI-style line, which the anthropic SDK would drop unread
    return error


# --- 1. paths ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_path", "upstream_path"),
    [
        ("/v1/messages", "/v1/messages"),
        ("/messages", "/v1/messages"),
        ("//messages", "/v1/messages"),  # SillyTavern with the reverse proxy URL http://host:port
        ("/v1//messages", "/v1/messages"),  # ... with http://host:port/v1/
        ("/v1/messages?beta=true", "/v1/messages?beta=true"),  # the SDK's beta calls
    ],
)
async def test_messages_paths_reach_the_upstreams_v1_messages(proxy, upstream, client, client_path, upstream_path):
    answer = await messages(client, proxy, path=client_path)
    assert answer.status == 200
    assert answer.json()["content"][0]["text"] == REPLY_TEXT
    assert [r.path for r in upstream.received] == [upstream_path]


async def test_a_base_with_a_path_gets_the_bare_endpoint(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"url": upstream.url + "/anthropic/v1"}})
    await messages(client, proxy, path="//messages")
    await messages(client, proxy, path="/v1/messages/count_tokens")
    assert [r.path for r in upstream.received] == ["/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens"]


async def test_count_tokens_is_retried_like_messages(proxy, upstream, client):
    upstream.script("messages/count_tokens", Status(529), Status(503))
    answer = await messages(client, proxy, path="/v1/messages/count_tokens")
    assert answer.status == 200 and answer.json()["input_tokens"] > 0
    assert len(upstream.received) == 3


async def test_an_anthropic_models_list_is_retried_and_served_from_the_cache(proxy, upstream, client):
    first = await call(client, "GET", proxy.url + "/v1/models", headers=ANTHROPIC_HEADERS)
    assert first.status == 200 and first.json()["data"][0]["type"] == "model"
    upstream.script("models", Status(529))
    assert (await call(client, "GET", proxy.url + "/v1/models", headers=ANTHROPIC_HEADERS)).body == first.body
    upstream.always("models", Status(529))
    cached = await call(client, "GET", proxy.url + "/v1/models", headers=ANTHROPIC_HEADERS)
    assert cached.status == 200 and cached.body == first.body
    assert cached.headers["x-seaking-cache"].startswith("stale")
    assert len(upstream.received) == 1 + 2 + 4


async def test_an_anthropic_models_failure_is_anthropic_shaped(proxy, upstream, client):
    upstream.always("models", Reset())
    answer = await call(client, "GET", proxy.url + "/v1/models", headers=ANTHROPIC_HEADERS)
    error = assert_anthropic_error(answer, 502, "api_error")
    assert "4 attempts" in error["message"]


# --- 2. auth and headers -----------------------------------------------------------------------------------------------


async def test_the_proxys_key_goes_upstream_as_x_api_key_for_an_anthropic_client(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    await messages(client, proxy, headers={"anthropic-beta": "output-128k-2025-02-19,context-1m-2025-08-07"})
    sent = upstream.received[0].headers
    assert sent["x-api-key"] == UPSTREAM_KEY
    assert "Authorization" not in sent  # Anthropic takes a key only as x-api-key
    assert sent["anthropic-version"] == "2023-06-01"
    assert sent["anthropic-beta"] == "output-128k-2025-02-19,context-1m-2025-08-07"


async def test_an_openai_client_still_gets_the_proxys_key_as_bearer(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    await chat(client, proxy)
    assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in upstream.received[0].headers


async def test_without_a_proxy_key_the_clients_x_api_key_goes_upstream(proxy, upstream, client):
    await messages(client, proxy)
    assert upstream.received[0].headers["x-api-key"] == CLIENT_KEY
    assert proxy.flows[0].request.headers["x-api-key"] == "[redacted]"


async def test_anthropics_response_headers_come_back(proxy, upstream, client):
    said = {"request-id": "req_011", "anthropic-ratelimit-requests-remaining": "49", "retry-after": "0"}
    upstream.script("messages", Status(529, headers=said), Status(200, body=message("ok", "m"), headers=said))
    answer = await messages(client, proxy)
    assert answer.status == 200
    for name, value in said.items():
        assert answer.headers[name] == value
    upstream.script("messages", Status(400, headers=said))
    failed = await messages(client, proxy)
    assert failed.status == 400 and failed.headers["request-id"] == "req_011"


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
async def test_the_access_key_is_accepted_as_x_api_key(proxy_factory, upstream, client, path):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": ACCESS_KEY}})
    body = MESSAGE if path.endswith("messages") else CHAT
    answer = await messages(client, proxy, body=body, path=path, headers={"x-api-key": ACCESS_KEY})
    assert answer.status == 200
    assert upstream.received[0].headers["x-api-key"] == UPSTREAM_KEY


async def test_a_wrong_proxy_password_is_refused_in_anthropics_shape(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": ACCESS_KEY}})
    answer = await messages(client, proxy, headers={"x-api-key": "not-the-proxy-password"})
    error = assert_anthropic_error(answer, 401, "authentication_error")
    assert error["code"] == "invalid_access_key" and "x-api-key" in error["message"]
    refused_openai = await chat(client, proxy, headers={"Authorization": "Bearer wrong-key-0000"})
    assert refused_openai.status == 401 and refused_openai.error["code"] == "invalid_access_key"  # OpenAI's shape
    assert upstream.received == []


# --- 3. retry codes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [529, 520, 521, 522, 523])
async def test_overloaded_and_cloudflares_origin_errors_are_retried_by_default(proxy, upstream, client, code):
    upstream.script("messages", Status(code), Status(code))
    answer = await messages(client, proxy)
    assert answer.status == 200
    assert len(upstream.received) == 3


async def test_cloudflares_524_is_passed_on_not_retried(proxy, upstream, client):
    page = "<html><head><title>api.example.com | 524: A timeout occurred</title></head><body>...</body></html>"
    upstream.script("messages", Status(524, body=page))
    answer = await messages(client, proxy)
    assert answer.status == 524 and b"524: A timeout occurred" in answer.body
    assert len(upstream.received) == 1


# --- 4. errors in Anthropic's shape ------------------------------------------------------------------------------------


async def test_exhausted_529s_are_overloaded_errors_with_the_attempt_count(proxy, upstream, client):
    upstream.always("messages", Status(529))
    answer = await messages(client, proxy)
    error = assert_anthropic_error(answer, 529, "overloaded_error")
    assert error["code"] == "upstream_http_529" and error["attempts"] == 4
    assert "upstream status 529" in error["message"] and "gave up after 4 attempts" in error["message"]
    assert "4 attempts" in answer.reason
    assert len(upstream.received) == 4


@pytest.mark.parametrize(
    ("config", "fault", "status", "error_type", "code"),
    [
        ({}, Reset(), 502, "api_error", "upstream_unreachable"),
        ({"target_proxy": {"timeout": 0.2, "max_retries": 1}}, Hang(), 504, "timeout_error", "upstream_timeout"),
        ({}, ErrorBody(), 502, "api_error", "upstream_bad_response"),
        ({"error_handling": {"deadline": 5}}, Status(429, headers={"Retry-After": "120"}), 429, "rate_limit_error", "rate_limited"),
        ({}, Status(500, body="<html><title>Internal Server Error</title></html>"), 500, "api_error", "upstream_http_500"),
    ],
    ids=["unreachable", "timeout", "2xx-error-body", "retry-after-past-deadline", "html-500"],
)
async def test_every_error_the_proxy_gives_up_with_is_anthropic_shaped(
    proxy_factory, upstream, client, config, fault, status, error_type, code
):
    proxy = await proxy_factory(config)
    upstream.always("messages", fault)
    error = assert_anthropic_error(await messages(client, proxy), status, error_type)
    assert error["code"] == code
    assert "attempt" in error["message"]
    assert "<html>" not in error["message"]


async def test_client_mistakes_are_anthropic_shaped(proxy_factory, upstream, client):
    proxy = await proxy_factory({"server": {"max_body_bytes": 1000}})
    too_large = {**MESSAGE, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_anthropic_error(await messages(client, proxy, body=too_large), 413, "request_too_large")
    not_json = await call(client, "POST", proxy.url + "/v1/messages", data=b"{nope", headers=ANTHROPIC_HEADERS)
    assert assert_anthropic_error(not_json, 400, "invalid_request_error")["code"] == "invalid_json"
    assert upstream.received == []


async def test_a_fail_fast_status_passes_on_the_upstreams_error_and_what_it_said_about_retrying(proxy, upstream, client):
    body = anthropic_error(401, "invalid x-api-key")
    upstream.script("messages", Status(401, body=body, headers={"x-should-retry": "true"}))
    answer = await messages(client, proxy)
    assert (answer.status, answer.json()) == (401, body)
    assert answer.headers["x-should-retry"] == "true"  # the upstream's word, not ours
    assert answer.reason == "Unauthorized: invalid x-api-key"

    upstream.script("messages", Status(403, body="<html><title>Forbidden by WAF</title></html>"))
    wrapped = await messages(client, proxy)
    assert wrapped.status == 403
    assert wrapped.json()["error"] == {"type": "permission_error", "message": "Upstream answered 403: Forbidden by WAF", "code": "upstream_http_403"}
    assert "x-should-retry" not in wrapped.headers  # the upstream said nothing about it
    assert len(upstream.received) == 2


# --- 5. streams ----------------------------------------------------------------------------------------------------------


async def test_a_stream_passes_through_event_by_event(proxy, upstream, client):
    upstream.script("messages", MessageStream(chunks=["a", "b", "c", "d"], delay=0.15))
    read = await read_events(client, proxy)
    assert (read.status, read.ended_cleanly) == (200, True)
    assert read.names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 4 + [
        "content_block_stop", "message_delta", "message_stop"]
    assert read.text == "abcd" and read.errors == []
    assert read.times[6] - read.times[3] > 0.3  # live, with the upstream's timing
    assert read.body.endswith(b'data: {"type": "message_stop"}\n\n')  # nothing after message_stop: no [DONE]


@pytest.mark.parametrize(
    "fault",
    [Status(529), MessageStream(error_first="Overloaded"), ErrorBody(), MessageStream(chunks=[], no_stop=True)],
    ids=["529", "error-event-after-message-start", "2xx-error-body", "no-content"],
)
async def test_failures_before_any_content_are_retried_and_the_retry_streams_live(proxy, upstream, client, fault):
    upstream.script("messages", fault, fault, MessageStream(chunks=["a", "b", "c", "d"], delay=0.1))
    read = await read_events(client, proxy)
    assert (read.status, read.text, read.errors) == (200, "abcd", [])
    assert read.names.count("message_start") == 1  # the failed attempts' preambles never reached the client
    assert read.times[-1] - read.times[3] > 0.2  # still event by event
    assert len(upstream.received) == 3


@pytest.mark.slow
async def test_pings_before_content_keep_a_slow_prompt_alive_silence_is_retried(proxy_factory, upstream, client):
    # Without hedging: the silent attempt is given up on (with hedging it would go on beside the next: test_hedging.py).
    proxy = await proxy_factory({"streaming": {"first_event_timeout": 0.5}, "error_handling": {"hedge_on_timeout": False}})
    # A long prompt: message_start at once, then 1.2 s of pings before the first text. Not a silent upstream.
    upstream.script("messages", MessageStream(think=1.2, ping_every=0.2))
    read = await read_events(client, proxy)
    assert (read.text, read.errors, len(upstream.received)) == (REPLY_TEXT, [], 1)
    # The same wait in silence after message_start is an upstream that stopped: retried, nothing was sent yet.
    upstream.script("messages", MessageStream(think=1.2))
    read = await read_events(client, proxy)
    assert (read.text, read.errors) == (REPLY_TEXT, [])
    assert read.names.count("message_start") == 1
    assert len(upstream.received) == 3
    assert upstream.received[1].disconnected_at is not None  # the silent attempt was closed, not left open
    assert proxy.flows[-1].metadata["seaking"]["attempts"][0]["detail"] == "upstream went silent for 0.5 s before any content"


# With resume off: how every break ends when the reply cannot be continued (tests/test_resume.py continues them).
NO_RESUME = {"streaming": {"resume": False}}


async def test_a_mid_stream_drop_ends_with_one_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory(NO_RESUME)
    upstream.script("messages", MessageStream(chunks=["a", "b", "c", "d"], drop_after=2))
    read = await read_events(client, proxy)
    assert read.text == "ab"
    error = assert_ended_with_one_error(read, "api_error", "stream_interrupted")
    assert "dropped in the middle of the stream" in error["message"]
    assert len(upstream.received) == 1  # content was sent: a retry would repeat it


async def test_a_silence_past_idle_timeout_ends_with_one_timeout_error(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"idle_timeout": 0.4, "resume": False}})
    upstream.script("messages", MessageStream(chunks=["a", "b", "c"], stall_after=1))
    read = await read_events(client, proxy)
    assert read.text == "a"
    assert_ended_with_one_error(read, "timeout_error", "stream_idle_timeout")


async def test_an_end_before_the_stop_reason_ends_with_one_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory(NO_RESUME)
    upstream.script("messages", MessageStream(chunks=["a", "b"], stop_reason=None, no_stop=True))
    read = await read_events(client, proxy)
    assert read.text == "ab" and "message_delta" not in read.names
    error = assert_ended_with_one_error(read, "api_error", "stream_incomplete")
    assert "no message_stop" in error["message"]


@pytest.mark.parametrize("fault", [{"no_stop": True}, {"drop_at_stop": True}], ids=["end", "drop"])
async def test_a_stream_that_ends_after_its_stop_reason_is_completed_with_message_stop(proxy_factory, upstream, client, fault):
    """The reply is whole once message_delta has said why it stopped: what is missing is only message_stop, which
    the client gets from the proxy (no error, no continuation)."""
    proxy = await proxy_factory(NO_RESUME)
    upstream.script("messages", MessageStream(chunks=["a", "b"], **fault))
    read = await read_events(client, proxy)
    assert (read.text, read.errors, read.ended_cleanly) == ("ab", [], True)
    assert read.names[-2:] == ["message_delta", "message_stop"]
    assert len(upstream.received) == 1


async def test_an_upstream_error_event_mid_stream_is_passed_on_never_doubled(proxy_factory, upstream, client):
    proxy = await proxy_factory(NO_RESUME)
    upstream.script("messages", MessageStream(chunks=["a", "b", "c"], error_after=2))
    read = await read_events(client, proxy)
    assert (read.status, read.ended_cleanly, read.text) == (200, True, "ab")
    assert read.errors == [{"type": "overloaded_error", "message": "Overloaded"}]  # the upstream's own, once
    assert b"[DONE]" not in read.body
    assert len(upstream.received) == 1


@pytest.mark.slow
async def test_heartbeats_are_sse_comments_until_the_stream_comes(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.2}})
    upstream.script("messages", Delayed(0.9, then=MessageStream(chunks=["x", "y"])))
    read = await read_events(client, proxy)
    assert read.heartbeats >= 3
    assert read.body.startswith(b": keep-alive\n\n")
    assert read.names[0] == "message_start" and read.names[-1] == "message_stop"  # heartbeats are no events
    assert (read.text, read.errors) == ("xy", [])
    assert b"[DONE]" not in read.body


async def test_giving_up_after_heartbeats_is_one_error_event(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}, "error_handling": {"base_delay": 0.15, "max_delay": 0.15}})
    upstream.always("messages", Delayed(0.05, then=Status(529)))
    read = await read_events(client, proxy)
    assert read.heartbeats >= 1
    error = assert_ended_with_one_error(read, "overloaded_error", "upstream_http_529")
    assert "4 attempts" in error["message"]


async def test_a_whole_message_after_heartbeats_is_told_as_events(proxy_factory, upstream, client):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.1}})
    upstream.script("messages", Delayed(0.4, then=Status(200, body=message("all at once", "claude-test"))))
    read = await read_events(client, proxy)
    assert read.names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                          "message_delta", "message_stop"]
    assert (read.text, read.errors) == ("all at once", [])


async def test_an_openai_stream_is_unchanged_by_the_anthropic_rules(proxy, upstream, client):
    """The OpenAI side keeps its own: `data: {"error"}` then [DONE] (test_streaming.py has the rest)."""
    upstream.script("chat/completions", Stream(chunks=["a", "b"], drop_after=1))
    async with client.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        body = await response.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'data: {"error"' in body and b"event: error" not in body


# --- 7. x-should-retry on both APIs --------------------------------------------------------------------------------------


async def test_openai_errors_the_proxy_gives_up_with_say_x_should_retry_false(proxy, upstream, client):
    upstream.always("chat/completions", Status(503))
    answer = await chat(client, proxy)
    assert (answer.status, answer.headers["x-should-retry"]) == (503, "false")
    upstream.always("chat/completions", None)
    upstream.script("chat/completions", Status(401, headers={"x-should-retry": "true"}))
    passed_on = await chat(client, proxy)
    assert (passed_on.status, passed_on.headers["x-should-retry"]) == (401, "true")
