"""GET /_seaking/metrics: scraped from real mitmproxy after real traffic, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHAT, call, chat
from seaking.lab.fault_upstream import Reset, Status, Stream
from seaking.metrics import attempt_result, request_outcome
from seaking.records import AttemptRecord, FlowRecord
from test_streaming import read_stream

PROMPT = "a prompt that must never become a label 7c1e"
ACCESS_KEY = "metrics-access-key-0001"


async def scrape(client, proxy, headers: dict | None = None) -> dict:
    """{(sample name, frozenset of labels): value}, from the proxy's metrics page."""
    answer = await call(client, "GET", proxy.url + "/_seaking/metrics", headers=headers or {})
    assert answer.status == 200, answer
    assert answer.headers["content-type"].startswith("text/plain; version=")  # Prometheus's text format
    samples = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    scrape.text = answer.body.decode()
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def test_requests_attempts_retries_and_give_ups_are_counted(proxy_factory, upstream, upstream_factory, client):
    backup = await upstream_factory()
    proxy = await proxy_factory({
        "targets": [{"url": backup.url}],
        "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60},
        "error_handling": {"max_retries": 3},
        "models": {"fallback": ["local-model"]},
    })
    primary, second = f"127.0.0.1:{upstream.port}", f"127.0.0.1:{backup.port}"
    body = {**CHAT, "messages": [{"role": "user", "content": PROMPT}]}
    assert (await chat(client, proxy, body=body)).status == 200  # 1 attempt
    upstream.script("chat/completions", Status(503))  # the primary fails once: its breaker opens
    assert (await chat(client, proxy, body=body)).headers["x-seaking-target"] == second
    backup.script("chat/completions", Status(401))
    assert (await chat(client, proxy, body=body)).status == 401  # fail fast, on the backup (the primary is open)
    backup.always("chat/completions", Status(429))
    upstream.always("chat/completions", Reset())
    gave_up = await chat(client, proxy, body=body)
    assert gave_up.status >= 429 and gave_up.error["attempts"] == 4
    bad = await call(client, "POST", proxy.url + "/v1/chat/completions", data=b"not json")
    assert bad.status == 400

    samples = await scrape(client, proxy)
    requests = "seaking_requests_total"
    assert value(samples, requests, endpoint="chat/completions", outcome="success") == 2
    assert value(samples, requests, endpoint="chat/completions", outcome="fail_fast") == 1
    assert value(samples, requests, endpoint="chat/completions", outcome="gave_up") == 1
    assert value(samples, requests, endpoint="chat/completions", outcome="refused") == 1
    attempts = "seaking_upstream_attempts_total"
    assert value(samples, attempts, target=primary, result="success") == 1
    assert value(samples, attempts, target=primary, result="http_503") == 1
    assert value(samples, attempts, target=second, result="success") == 1
    assert value(samples, attempts, target=second, result="fail_fast") == 1
    assert value(samples, attempts, target=second, result="http_429") >= 2
    assert total(samples, attempts, result="network") >= 1
    assert value(samples, "seaking_retries_total", endpoint="chat/completions") == 1 + 3
    assert value(samples, "seaking_give_ups_total", reason="attempts") == 1
    assert value(samples, "seaking_breaker_state", target=primary, position="0", state="open") == 1
    assert value(samples, "seaking_breaker_state", target=primary, position="0", state="closed") == 0
    assert value(samples, "seaking_breaker_state", target=second, position="1", state="open") == 1  # after its 429s
    assert value(samples, "seaking_time_to_first_byte_seconds_count", endpoint="chat/completions", stream="false") == 4
    assert value(samples, "seaking_request_duration_seconds_count", endpoint="chat/completions", stream="false") == 5
    assert value(samples, "seaking_request_duration_seconds_bucket", endpoint="chat/completions", stream="false", le="+Inf") == 5

    upstream.always("models", Status(503))
    backup.always("models", Status(503))
    assert (await call(client, "GET", proxy.url + "/v1/models")).headers["x-seaking-cache"] == "fallback"
    samples = await scrape(client, proxy)
    assert value(samples, requests, endpoint="models", outcome="models_cache") == 1
    assert value(samples, "seaking_give_ups_total", reason="attempts") == 2  # the exchange gave up before the fallback


async def test_labels_never_carry_keys_prompts_or_urls(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"url": upstream.url + "/v1/secret-path-token", "api_key": "sk-upstream-9a8b7c6d"}})
    body = {**CHAT, "messages": [{"role": "user", "content": PROMPT}]}
    await chat(client, proxy, body=body, headers={"Authorization": "Bearer sk-client-5e4d3c2b"})
    upstream.script("chat/completions", Status(503, body={"error": {"message": f"bad: {PROMPT}"}}))
    await chat(client, proxy, body=body)
    await call(client, "GET", proxy.url + "/some/unknown/path?q=" + PROMPT.replace(" ", "+"))
    samples = await scrape(client, proxy)
    for secret in (PROMPT, "sk-upstream-9a8b7c6d", "sk-client-5e4d3c2b", "secret-path-token", "unknown/path", "://"):
        assert secret not in scrape.text
    allowed = {
        "endpoint": re.compile(r"^(chat/completions|completions|messages|embeddings|models|other)$"),
        "target": re.compile(r"^[\w.-]+(:\d+)?$|^none$"),
        "outcome": re.compile(r"^[a-z_]+$"),
        "result": re.compile(r"^[a-z_]+(_\d{3})?$|^http_\d{3}$"),
        "reason": re.compile(r"^(attempts|deadline|budget)$"),
    }
    for _, labels in samples:
        for name, label in labels:
            if name in allowed:
                assert allowed[name].match(label), (name, label)
    assert value(samples, "seaking_requests_total", endpoint="other", outcome="success") == 1


@pytest.mark.slow
async def test_streams_in_flight_and_stream_errors(proxy, upstream, client):
    upstream.script("chat/completions", Stream(chunks=[f"w{i} " for i in range(10)], delay=0.2), Stream(drop_after=2))
    reading = asyncio.create_task(read_stream(client, proxy))
    await asyncio.sleep(0.8)
    during = await scrape(client, proxy)
    assert value(during, "seaking_streams_in_flight") == 1
    assert (await reading).errors == []
    dropped = await read_stream(client, proxy)
    assert dropped.errors[0]["code"] == "stream_interrupted"
    after = await scrape(client, proxy)
    assert value(after, "seaking_streams_in_flight") == 0
    assert value(after, "seaking_requests_total", endpoint="chat/completions", outcome="success") == 1
    assert value(after, "seaking_requests_total", endpoint="chat/completions", outcome="stream_error") == 1
    assert value(after, "seaking_time_to_first_byte_seconds_count", endpoint="chat/completions", stream="true") == 2
    slow = value(after, "seaking_request_duration_seconds_bucket", endpoint="chat/completions", stream="true", le="1.0")
    assert slow == 1  # the 2 s stream is past 1 s; the dropped one is not
    assert value(after, "seaking_requests_total", endpoint="other", outcome="local") == 0  # scrapes are not counted


async def test_retry_budget_refusals(proxy_factory, upstream, client):
    proxy = await proxy_factory({"retry_budget": {"percent": 0, "min_per_second": 0}})
    upstream.always("chat/completions", Status(503))
    assert (await chat(client, proxy)).error["attempts"] == 1
    samples = await scrape(client, proxy)
    assert value(samples, "seaking_retry_budget_refusals_total") == 1
    assert value(samples, "seaking_give_ups_total", reason="budget") == 1


async def test_the_metrics_need_the_access_key_when_one_is_set(proxy_factory, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": "sk-upstream-0001"}, "server": {"access_key": ACCESS_KEY}})
    refused = await call(client, "GET", proxy.url + "/_seaking/metrics")
    assert (refused.status, refused.error["code"]) == (401, "invalid_access_key")
    samples = await scrape(client, proxy, headers={"Authorization": f"Bearer {ACCESS_KEY}"})
    assert value(samples, "seaking_requests_total", endpoint="other", outcome="refused") == 0  # its own path is not counted


@pytest.mark.parametrize(
    ("record", "failed", "outcome"),
    [
        ({"refused": "invalid_access_key"}, False, "refused"),
        ({"refused": "proxy_shutdown"}, False, "shutdown"),
        ({"verdict": "retry", "ended_early": "proxy_shutdown"}, False, "shutdown"),
        ({"verdict": "success", "stream_error": "proxy_shutdown"}, False, "shutdown"),
        ({"verdict": "success", "stream_error": "stream_interrupted"}, False, "stream_error"),
        ({"verdict": "success"}, True, "client_left"),
        ({"verdict": "retry", "answered_by": "models cache"}, False, "models_cache"),
        ({"verdict": "retry"}, False, "gave_up"),
        ({"verdict": "pass_through"}, False, "pass_through"),
        ({}, False, "refused"),
    ],
)
def test_request_outcomes(record, failed, outcome):
    assert request_outcome(FlowRecord.from_metadata(record), failed) == outcome


def test_attempt_results():
    def result(**attempt) -> str:
        return attempt_result(AttemptRecord.from_metadata(attempt))

    assert result(verdict="retry", failure="status", status=503) == "http_503"
    assert result(verdict="retry", failure="timeout", status=None) == "timeout"
    assert result(verdict="fail_fast", failure=None, status=401) == "fail_fast"
