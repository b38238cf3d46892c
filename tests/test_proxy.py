"""Behaviour of the addon in real mitmproxy, against the real fault-injecting upstream, through a real HTTP client.

Sections follow the numbered behaviours of the core issue.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import socket
import time

import aiohttp
import pytest
from mitmproxy import exceptions, io
from mitmproxy.proxy.layers.http import HttpRequestHook as RequestHook

from conftest import CHAT, call, chat, is_attempt
from seaking.lab.fault_upstream import (
    MODEL_IDS, REPLY_TEXT, CutOff, Delayed, Empty, ErrorBody, Hang, Malformed, Reset, Status,
)
from seaking.upstream_run import UpstreamRun

CLIENT_KEY = "sk-client-key-123456"
UPSTREAM_KEY = "sk-upstream-secret-abcdef"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. paths ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_path",
    ["/v1/chat/completions", "/chat/completions", "/v1//chat/completions", "//chat/completions/", "/v1/chat/completions?x=1"],
)
async def test_known_endpoints_map_onto_a_target_base_with_path(proxy_factory, upstream, client, client_path):
    proxy = await proxy_factory({"target_proxy": {"url": upstream.url + "/api/v1/studio"}})
    answer = await chat(client, proxy, path=client_path)
    assert answer.status == 200
    query = "?x=1" if "?" in client_path else ""
    assert [r.path for r in upstream.received] == ["/api/v1/studio/chat/completions" + query]


@pytest.mark.parametrize("endpoint", ["completions", "embeddings", "messages", "models"])
async def test_every_api_endpoint_is_mapped(proxy_factory, upstream, client, endpoint):
    proxy = await proxy_factory({"target_proxy": {"url": upstream.url + "/base/v1/"}})
    method = "GET" if endpoint == "models" else "POST"
    answer = await call(client, method, f"{proxy.url}/v1//{endpoint}", json=None if method == "GET" else CHAT)
    assert answer.status == 200
    assert upstream.received[-1].path == f"/base/v1/{endpoint}"


async def test_without_a_target_url_the_reverse_target_gets_the_tidied_client_path(proxy, upstream, client):
    await chat(client, proxy, path="/v1//chat/completions")
    await chat(client, proxy, path="/chat/completions")
    assert [r.path for r in upstream.received] == ["/v1/chat/completions", "/chat/completions"]


async def test_other_paths_pass_through_to_the_target_host_unchanged(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"url": upstream.url + "/api/v1"}})
    answer = await call(client, "GET", proxy.url + "/health//deep?probe=1")
    assert answer.status == 200
    assert answer.json() == {"path": "/health//deep?probe=1", "method": "GET"}


# --- 2. classification -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
async def test_retry_codes_are_retried_until_success(proxy, upstream, client, code):
    upstream.script("chat/completions", Status(code), Status(code))
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    assert len(upstream.received) == 3


@pytest.mark.parametrize("code", [400, 401, 403])
async def test_fail_codes_fail_fast(proxy, upstream, client, code):
    upstream.script("chat/completions", Status(code))
    answer = await chat(client, proxy)
    assert answer.status == code
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    "fault", [Reset(), CutOff(), Empty(), Malformed(), ErrorBody()], ids=["reset", "cut-off", "empty", "malformed", "error-object"]
)
async def test_network_and_broken_answers_are_retried(proxy, upstream, client, fault):
    upstream.script("chat/completions", fault, fault)
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    assert len(upstream.received) == 3


async def test_no_headers_within_the_timeout_is_retried(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 0.3}})
    upstream.script("chat/completions", Hang())
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert len(upstream.received) == 2


@pytest.mark.parametrize("code", [404, 409, 422])
async def test_other_statuses_pass_through_as_received(proxy, upstream, client, code):
    upstream.script("chat/completions", Status(code, body="plain words", headers={"x-upstream": "yes"}))
    answer = await chat(client, proxy)
    assert (answer.status, answer.body, answer.headers["x-upstream"]) == (code, b"plain words", "yes")
    assert len(upstream.received) == 1


async def test_custom_codes_from_config_are_used(proxy_factory, upstream, client):
    proxy = await proxy_factory({"error_handling": {"retry_codes": [404], "fail_codes": [503]}})
    upstream.script("chat/completions", Status(404), Status(503))
    answer = await chat(client, proxy)
    assert answer.status == 503
    assert len(upstream.received) == 2


# --- 3. back-off, Retry-After, limits ----------------------------------------------------------------------------


async def test_max_retries_bounds_the_attempts(proxy_factory, upstream, client):
    proxy = await proxy_factory({"error_handling": {"max_retries": 2}})
    upstream.always("chat/completions", Status(503))
    answer = await chat(client, proxy)
    assert answer.status == 503
    assert answer.error["attempts"] == 3
    assert len(upstream.received) == 3


async def test_zero_retries_means_one_attempt(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"max_retries": 0}})
    upstream.always("chat/completions", Status(502))
    assert (await chat(client, proxy)).status == 502
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    ("headers", "asked"),
    [({"Retry-After": "1"}, 1.0), ({"retry-after-ms": "600"}, 0.6)],
    ids=["seconds", "milliseconds"],
)
@pytest.mark.slow
async def test_retry_after_is_honoured(proxy, upstream, client, headers, asked):
    upstream.script("chat/completions", Status(429, headers=headers))
    started = time.monotonic()
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert len(upstream.received) == 2
    # The policy's own back-off is at most 0.05 s here: a wait this long can only come from the header.
    assert time.monotonic() - started >= asked - 0.05


@pytest.mark.slow
async def test_retry_after_as_http_date_is_honoured(proxy, upstream, client):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    upstream.script("chat/completions", Status(503, headers={"Retry-After": when}))
    started = time.monotonic()
    assert (await chat(client, proxy)).status == 200
    assert time.monotonic() - started >= 0.9  # HTTP dates have whole seconds: at least 1 s of the 2 asked


async def test_a_wait_past_the_deadline_answers_429_with_retry_after_at_once(proxy_factory, upstream, client):
    proxy = await proxy_factory({"error_handling": {"deadline": 5}})
    upstream.script("chat/completions", Status(429, headers={"Retry-After": "120"}))
    started = time.monotonic()
    answer = await chat(client, proxy)
    assert time.monotonic() - started < 3
    assert answer.status == 429
    assert answer.error["retry_after"] == 120
    assert answer.error["code"] == "rate_limited"
    assert answer.headers["Retry-After"] == "120"
    assert len(upstream.received) == 1


@pytest.mark.slow
async def test_the_deadline_bounds_all_attempts_together(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 0.4, "max_retries": 50}, "error_handling": {"deadline": 1}})
    upstream.always("chat/completions", Hang())
    started = time.monotonic()
    answer = await chat(client, proxy)
    assert time.monotonic() - started < 5
    assert answer.status == 504
    assert "deadline" in answer.error["message"]
    assert 2 <= len(upstream.received) <= 4


# --- 4. answers --------------------------------------------------------------------------------------------------


async def test_a_success_is_the_upstream_answer_as_received(proxy, upstream, client):
    body = {"id": "x", "choices": [{"message": {"content": "ünïcödé"}}], "extra": [1, 2]}
    upstream.script("chat/completions", Status(200, body=body, headers={"x-request-id": "abc", "Set-Cookie": "a=1"}))
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert answer.json() == body
    assert answer.headers["x-request-id"] == "abc"
    assert answer.headers["Content-Type"].startswith("application/json")


async def test_unreachable_upstream_is_a_502_with_the_attempt_count(proxy_factory, client):
    proxy = await proxy_factory(target=f"http://127.0.0.1:{closed_port()}")
    answer = await chat(client, proxy)
    assert answer.status == 502
    assert answer.error["code"] == "upstream_unreachable"
    assert answer.error["type"] == "upstream_error"
    assert answer.error["message"].startswith("Cannot connect to upstream 127.0.0.1:")
    assert "Connection refused" in answer.error["message"] and "after 4 attempts" in answer.error["message"]
    # SillyTavern 1.19 shows only the reason phrase: it must say what happened.
    assert answer.reason.startswith("Cannot connect to upstream") and "4 attempts" in answer.reason


async def test_an_unknown_host_is_a_502(proxy_factory, client):
    proxy = await proxy_factory({"target_proxy": {"url": "http://seaking-no-such-host.invalid/v1", "max_retries": 0}})
    answer = await chat(client, proxy)
    assert answer.status == 502
    assert answer.error["code"] == "upstream_unreachable"


async def test_timeouts_are_a_504(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 0.2, "max_retries": 1}, "error_handling": {"hedge_on_timeout": False}})
    upstream.always("chat/completions", Hang())
    answer = await chat(client, proxy)
    assert answer.status == 504
    assert answer.error["code"] == "upstream_timeout"
    assert "within 0.2 s" in answer.error["message"] and "2 attempts" in answer.reason


async def test_broken_bodies_are_a_502(proxy, upstream, client):
    upstream.always("chat/completions", Malformed())
    answer = await chat(client, proxy)
    assert answer.status == 502
    assert answer.error["code"] == "upstream_bad_response"
    assert "not JSON" in answer.error["message"]


async def test_a_long_upstream_message_leaves_the_attempt_count_in_the_reason_phrase(proxy, upstream, client):
    upstream.always("chat/completions", Status(503, body={"error": {"message": "overloaded " * 60}}))
    answer = await chat(client, proxy)
    assert "gave up after 4 attempts" in answer.reason
    assert len(answer.reason) <= 200
    assert answer.error["message"].count("overloaded") > answer.reason.count("overloaded")  # the body keeps more


async def test_exhausted_retry_codes_keep_the_upstream_status_and_message(proxy, upstream, client):
    upstream.always("chat/completions", Status(429, body={"error": {"message": "slow down, friend"}}, headers={"Retry-After": "0"}))
    answer = await chat(client, proxy)
    assert answer.status == 429
    assert "slow down, friend" in answer.error["message"]
    assert answer.error["retry_after"] == 0
    assert "429" in answer.reason


async def test_fail_fast_keeps_an_openai_error_body_and_shows_its_message_in_the_reason(proxy, upstream, client):
    body = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}
    upstream.script("chat/completions", Status(401, body=body))
    answer = await chat(client, proxy)
    assert answer.status == 401
    assert answer.json() == body
    assert answer.reason == "Unauthorized: Incorrect API key provided"


async def test_fail_fast_wraps_a_non_openai_body(proxy, upstream, client):
    upstream.script("chat/completions", Status(403, body="<html>Forbidden by WAF</html>"))
    answer = await chat(client, proxy)
    assert answer.status == 403
    assert answer.error["type"] == "permission_error"
    assert answer.error["code"] == "upstream_http_403"
    assert "Forbidden by WAF" in answer.error["message"]


async def test_error_answers_are_never_html_or_empty(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"max_retries": 0}})
    for fault in (Reset(), Empty(), Malformed(), Status(500, body="")):
        upstream.script("chat/completions", fault)
        answer = await chat(client, proxy)
        assert answer.status >= 500
        assert answer.headers["Content-Type"] == "application/json"
        assert set(answer.error) >= {"message", "type", "code"}


# --- 5. /models ----------------------------------------------------------------------------------------------------


async def test_models_are_passed_through_and_cached_across_restarts(proxy_factory, upstream, client, tmp_path):
    proxy = await proxy_factory()
    first = await call(client, "GET", proxy.url + "/v1/models")
    assert first.status == 200
    assert [m["id"] for m in first.json()["data"]] == list(MODEL_IDS)
    assert "x-seaking-cache" not in first.headers
    await proxy.stop()

    upstream.always("models", Status(503))
    restarted = await proxy_factory()  # same cache file, empty memory
    cached = await call(client, "GET", restarted.url + "/v1/models")
    assert cached.status == 200
    assert cached.body == first.body
    assert cached.headers["x-seaking-cache"].startswith("stale; age=")
    assert int(cached.headers["Age"]) >= 0
    assert len(upstream.received_at("models")) == 1 + 4


async def test_models_unreachable_serve_the_cache_from_memory(proxy, upstream, client):
    assert (await call(client, "GET", proxy.url + "/models")).status == 200
    upstream.always("models", Reset())
    cached = await call(client, "GET", proxy.url + "/models")
    assert cached.status == 200 and "stale" in cached.headers["x-seaking-cache"]


async def test_models_fallback_when_nothing_is_cached(proxy_factory, upstream, client):
    proxy = await proxy_factory({"models": {"fallback": ["gpt-4o-mini", "backup-model"]}})
    upstream.always("models", Malformed())
    answer = await call(client, "GET", proxy.url + "/v1/models")
    assert answer.status == 200
    assert [m["id"] for m in answer.json()["data"]] == ["gpt-4o-mini", "backup-model"]
    assert answer.headers["x-seaking-cache"] == "fallback"


async def test_models_without_cache_or_fallback_is_an_openai_error(proxy, upstream, client):
    upstream.always("models", Status(503))
    answer = await call(client, "GET", proxy.url + "/v1/models")
    assert answer.status == 503
    assert set(answer.error) >= {"message", "type", "code"}


async def test_models_auth_failures_are_shown_not_hidden_by_the_cache(proxy, upstream, client):
    assert (await call(client, "GET", proxy.url + "/v1/models")).status == 200
    upstream.script("models", Status(401))
    assert (await call(client, "GET", proxy.url + "/v1/models")).status == 401


# --- 6. bad client input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"not json", b"{\"model\": ", b"[1, 2]", b"\xff\xfe\x00garbage"])
async def test_a_body_that_is_not_a_json_object_gets_400_and_is_not_forwarded(proxy, upstream, client, body):
    answer = await call(
        client, "POST", proxy.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status == 400
    assert answer.error["code"] == "invalid_json"
    assert answer.error["type"] == "invalid_request_error"
    assert upstream.received == []


async def test_a_body_over_the_limit_gets_413_and_is_not_forwarded(proxy_factory, upstream, client):
    proxy = await proxy_factory({"server": {"max_body_bytes": 1000}})
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    answer = await chat(client, proxy, body=big)
    assert answer.status == 413
    assert answer.error["code"] == "request_too_large"

    async def chunked():
        yield json.dumps(big).encode()

    answer = await call(client, "POST", proxy.url + "/v1/chat/completions", data=chunked())
    assert answer.status == 413
    assert upstream.received == []
    assert (await chat(client, proxy)).status == 200  # a small one still goes through


async def test_odd_requests_do_not_crash_the_addon(proxy, upstream, client):
    odd = [
        ("GET", "/v1/chat/completions", None),  # wrong method: forwarded, the upstream decides
        ("DELETE", "/v1/models", None),
        ("POST", "/v1/embeddings", b'{"input": "\\ud800"}'),
        ("PUT", "/%00/../../etc/passwd", b"\x00\x01"),
        ("POST", "/v1/chat/completions?" + "a" * 3000, json.dumps(CHAT).encode()),
    ]
    for method, path, data in odd:
        answer = await call(client, method, proxy.url + path, data=data)
        assert 200 <= answer.status < 600
    gzip_lie = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    answer = await call(client, "POST", proxy.url + "/v1/chat/completions", data=b"not gzip", headers=gzip_lie)
    assert answer.status == 400
    assert (await chat(client, proxy)).status == 200


# --- 7. security -----------------------------------------------------------------------------------------------------


async def test_api_key_replaces_the_client_authorization_upstream(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    await chat(client, proxy, headers={"Authorization": "Bearer undefined"})
    assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_environment_overrides_the_api_key(proxy_factory, upstream, client, monkeypatch):
    monkeypatch.setenv("SEAKING_API_KEY", "sk-from-environment-0001")
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    await chat(client, proxy)
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-from-environment-0001"


async def test_without_api_key_the_client_key_is_forwarded(proxy, upstream, client):
    await chat(client, proxy)
    assert upstream.received[0].headers["Authorization"] == f"Bearer {CLIENT_KEY}"


async def test_access_key_is_required_when_set(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": "let-me-in-please"}})
    for auth in ("Bearer undefined", "Bearer let-me-in-pleasE", ""):
        answer = await chat(client, proxy, headers={"Authorization": auth})
        assert answer.status == 401
        assert answer.error["code"] == "invalid_access_key"
        assert "access key" in answer.reason
    assert upstream.received == []
    assert (await chat(client, proxy, headers={"Authorization": "Bearer let-me-in-please"})).status == 200
    assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_keys_never_reach_flows_logs_or_error_messages(proxy_factory, upstream, client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    recording = tmp_path / "flows.mitm"
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}}, save_stream_file=str(recording))
    echo = {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}"}}
    upstream.script("chat/completions", Status(503, body=echo), Status(401, body=echo))
    answer = await chat(client, proxy, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert answer.status == 401
    upstream.script("chat/completions", Status(503, body=echo))
    assert (await chat(client, proxy)).status == 200
    await proxy.stop()

    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert secret not in answer.body.decode() and secret not in answer.reason
        assert secret not in caplog.text
        assert secret.encode() not in recording.read_bytes()
    assert "[redacted]" in answer.error["message"]
    with recording.open("rb") as fh:
        flows = list(io.FlowReader(fh).stream())
    assert len([f for f in flows if not is_attempt(f)]) == 2 and len([f for f in flows if is_attempt(f)]) == 4
    assert all(f.request.headers["authorization"] == "Bearer [redacted]" for f in flows)
    assert "retrying" in caplog.text  # the log lines that were scrubbed exist


async def test_the_client_key_is_scrubbed_when_it_is_the_upstream_key(proxy, upstream, client):
    upstream.script("chat/completions", Status(401, body=f"key {CLIENT_KEY} is not valid"))
    answer = await chat(client, proxy)
    assert answer.status == 401
    assert CLIENT_KEY not in answer.body.decode() and CLIENT_KEY not in answer.reason
    assert proxy.flows[0].request.headers["authorization"] == "Bearer [redacted]"


async def test_api_key_without_access_key_refuses_a_non_loopback_listener(proxy_factory):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    with pytest.raises(exceptions.OptionsError, match=r"--listen-host 127\.0\.0\.1.*access_key"):
        proxy.master.options.update(listen_host="0.0.0.0")
    with pytest.raises(exceptions.OptionsError, match="all network interfaces"):
        proxy.master.options.update(listen_host="")


async def test_a_loopback_listener_or_an_access_key_is_enough(proxy_factory):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    proxy.master.options.update(listen_host="::1")
    proxy.master.options.update(listen_host="localhost")
    guarded = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": "k" * 12}})
    guarded.master.options.update(listen_host="0.0.0.0")


async def test_mitmproxy_connects_upstream_only_when_a_flow_asks_even_if_told_otherwise(proxy):
    # Eager, an unreachable target would close every client connection before the pipeline could answer it.
    proxy.master.options.update(connection_strategy="eager")
    assert proxy.master.options.connection_strategy == "lazy"


# --- 8. mitmweb ------------------------------------------------------------------------------------------------------


async def test_retried_flows_are_marked_with_their_attempt_history(proxy, upstream, client):
    upstream.script("chat/completions", Status(503), Delayed(0.05, then=Status(503)))
    await chat(client, proxy)
    flow = proxy.flows[-1]
    assert flow.marked == ":repeat:"
    assert flow.comment.startswith("3 attempts: 503, 503, 200 in ")
    assert flow.comment.endswith(" s, 1 → 3 tokens")  # the usage the good answer reported
    assert flow.request.url == upstream.url + "/v1/chat/completions"


async def test_single_successes_are_not_marked_and_say_only_their_tokens(proxy, upstream, client):
    await chat(client, proxy)
    assert proxy.flows[-1].marked == ""
    assert re.fullmatch(r"1 attempt: 200 in \d+\.\d s, 1 → 3 tokens", proxy.flows[-1].comment)
    await chat(client, proxy, path="/v1/embeddings", body={"model": "e", "input": "x"})  # no usage: nothing to say
    assert (proxy.flows[-1].marked, proxy.flows[-1].comment) == ("", "")


async def test_proxy_made_answers_say_so(proxy, upstream, client):
    upstream.always("chat/completions", Reset())
    await chat(client, proxy)
    flow = proxy.flows[-1]
    assert flow.comment.startswith("4 attempts: network ×4 → gave up (502 by seaking-proxy) in ")
    assert flow.marked == ":x:"


async def test_concurrent_requests_are_independent(proxy, upstream, client):
    upstream.script("chat/completions", *[Status(503)] * 10)
    answers = await asyncio.gather(*(chat(client, proxy) for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert len(upstream.received) == 30


async def test_replays_from_mitmweb_are_left_to_mitmproxy(proxy, upstream, client):
    await chat(client, proxy)
    flow = proxy.flows[-1].copy()
    flow.response = None
    flow.is_replay = "request"
    await proxy.master.addons.trigger_event(RequestHook(flow))
    assert flow.response is None


@pytest.mark.slow
async def test_a_client_that_leaves_stops_its_request_upstream(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 10}})
    upstream.always("chat/completions", Hang())
    with pytest.raises(asyncio.TimeoutError):
        await chat(client, proxy, timeout=aiohttp.ClientTimeout(total=0.3))
    left = time.monotonic()
    for _ in range(60):
        if upstream.received and upstream.received[0].disconnected_at is not None:
            break
        await asyncio.sleep(0.05)
    assert upstream.received[0].disconnected_at - left < 1.5  # not the 10 s per-try timeout
    await asyncio.sleep(0.3)
    assert len(upstream.received) == 1  # and no retry for nobody


async def test_a_bug_in_the_exchange_gets_a_clear_error_not_mitmproxys_own_forwarding(
    proxy, upstream, client, caplog, monkeypatch
):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(UpstreamRun, "result", broken)
    answer = await chat(client, proxy)
    assert (answer.status, answer.error["code"], answer.headers["x-should-retry"]) == (500, "proxy_internal_error", "false")
    assert upstream.received == []  # mitmproxy did not forward it
    assert "RuntimeError: a bug" in caplog.text
    streamed = await call(client, "POST", proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert (streamed.status, streamed.error["code"]) == (500, "proxy_internal_error") and upstream.received == []
