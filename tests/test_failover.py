"""Failover across several real fault-injecting upstreams: routing, model fallback, circuit breakers, health checks,
the retry budget, load balancing and the x-seaking-* headers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from conftest import call, chat
from seaking.lab.fault_upstream import Reset, Status, Stream
from test_streaming import read_stream

BACKUP_KEY = "sk-backup-secret-0001"


@pytest.fixture
async def backup(upstream_factory):
    return await upstream_factory()


def host(server) -> str:
    return f"127.0.0.1:{server.port}"


def with_targets(*servers, **extra) -> dict:
    return {"targets": [{"url": s.url + "/v1", "api_key": BACKUP_KEY} for s in servers], **extra}


# --- 1. failover to the next target --------------------------------------------------------------------------------


async def test_a_failing_target_fails_over_to_the_next_without_waiting(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory({**with_targets(backup), "error_handling": {"base_delay": 5, "max_delay": 5}})
    upstream.always("chat/completions", Status(503))
    started = time.monotonic()
    answer = await chat(client, proxy)
    assert time.monotonic() - started < 2.5  # a back-off of up to 5 s was not waited for
    assert answer.status == 200
    assert (answer.headers["x-seaking-target"], answer.headers["x-seaking-attempts"]) == (host(backup), "2")
    assert backup.received[0].headers["Authorization"] == f"Bearer {BACKUP_KEY}"  # each target its own key
    assert backup.received[0].path == "/v1/chat/completions"
    assert "503 127.0.0.1" in proxy.flows[-1].comment and f"200 {host(backup)}" in proxy.flows[-1].comment


async def test_when_every_target_failed_it_backs_off_and_goes_round_again(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory({**with_targets(backup), "error_handling": {"base_delay": 0.3, "max_delay": 0.3}})
    upstream.always("chat/completions", Status(503))
    backup.always("chat/completions", Status(502))
    answer = await chat(client, proxy)
    assert answer.status == 502 and answer.error["attempts"] == 4
    arrivals = sorted([("a", r) for r in upstream.received] + [("b", r) for r in backup.received], key=lambda x: x[1].arrived)
    assert [name for name, _ in arrivals] == ["a", "b", "a", "b"]


async def test_a_stream_survives_a_failover_before_its_first_byte(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory(with_targets(backup))
    upstream.always("chat/completions", Reset())
    backup.script("chat/completions", Stream(chunks=["from ", "backup"], delay=0.1))
    read = await read_stream(client, proxy)
    assert read.status == 200 and read.text == "from backup" and read.errors == []
    assert read.headers["x-seaking-target"] == host(backup)
    assert read.data[-1] == b"[DONE]"


# --- 2. model fallback ------------------------------------------------------------------------------------------------


async def test_an_unavailable_model_falls_back_to_the_next_model(proxy_factory, upstream, client):
    proxy = await proxy_factory({"model_fallbacks": {"big-model": ["small-model"]}})
    missing = {"error": {"message": "The model `big-model` does not exist", "code": "model_not_found"}}
    upstream.script("chat/completions", Status(404, body=missing))
    answer = await chat(client, proxy, body={"model": "big-model", "messages": []})
    assert answer.status == 200
    assert answer.headers["x-seaking-model"] == "small-model"
    assert [r.json()["model"] for r in upstream.received] == ["big-model", "small-model"]
    assert answer.json()["model"] == "small-model"


async def test_a_model_whose_attempts_are_used_up_falls_back(proxy_factory, upstream, client):
    proxy = await proxy_factory({"model_fallbacks": {"big-model": ["small-model"]}, "error_handling": {"max_retries": 1}})
    upstream.script("chat/completions", Status(503), Status(503))
    answer = await chat(client, proxy, body={"model": "big-model", "messages": [], "temperature": 0.5})
    assert answer.status == 200 and answer.headers["x-seaking-model"] == "small-model"
    assert [r.json()["model"] for r in upstream.received] == ["big-model", "big-model", "small-model"]
    assert upstream.received[-1].json()["temperature"] == 0.5  # only the model changes


async def test_without_a_fallback_model_the_failure_stands(proxy_factory, upstream, client):
    proxy = await proxy_factory({"model_fallbacks": {"other": ["x"]}})
    upstream.script("chat/completions", Status(404, body={"error": {"message": "model not found"}}))
    answer = await chat(client, proxy, body={"model": "big-model", "messages": []})
    assert answer.status == 404 and answer.headers["x-seaking-model"] == "big-model"


# --- 3. circuit breakers ----------------------------------------------------------------------------------------------


async def test_an_open_breaker_skips_its_target_until_a_probe_closes_it(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory({**with_targets(backup), "circuit_breaker": {"failure_threshold": 2, "open_seconds": 0.5}})
    upstream.always("chat/completions", Reset())
    for _ in range(2):
        assert (await chat(client, proxy)).status == 200
    assert len(upstream.received) == 2
    state = (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"]
    assert [t["state"] for t in state] == ["open", "closed"]
    for _ in range(3):  # open: the primary is not even tried
        assert (await chat(client, proxy)).headers["x-seaking-attempts"] == "1"
    assert len(upstream.received) == 2

    upstream.always("chat/completions", None)  # it recovers
    await asyncio.sleep(0.6)
    answer = await chat(client, proxy)  # half-open: this request is the probe
    assert answer.headers["x-seaking-target"] == host(upstream)
    state = (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"]
    assert state[0]["state"] == "closed"


async def test_with_every_breaker_open_the_target_that_failed_longest_ago_is_tried(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory(
        {**with_targets(backup), "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60}, "error_handling": {"max_retries": 1}}
    )
    upstream.always("chat/completions", Status(503))
    backup.always("chat/completions", Status(503))
    await chat(client, proxy)  # opens both: primary first, then backup
    upstream.always("chat/completions", None)
    backup.always("chat/completions", None)
    answer = await chat(client, proxy)
    assert answer.status == 200
    assert answer.headers["x-seaking-target"] == host(upstream)


# --- 4. health checks and status ------------------------------------------------------------------------------------------


async def test_health_checks_notice_a_target_coming_back(proxy_factory, upstream, upstream_factory, client):
    backup = await upstream_factory()
    port = backup.port
    await backup.stop()  # down before the proxy starts
    proxy = await proxy_factory(
        {**with_targets(backup), "health_check": {"interval": 0.2}, "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60}}
    )

    async def backup_state() -> dict:
        return (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"][1]

    for _ in range(50):
        if (await backup_state())["state"] == "open":
            break
        await asyncio.sleep(0.1)
    down = await backup_state()
    assert down["state"] == "open" and "cannot connect" in down["last_error"]

    revived = await upstream_factory(port)  # restarted on the same port
    for _ in range(50):
        if (await backup_state())["state"] == "closed":
            break
        await asyncio.sleep(0.1)
    assert (await backup_state())["state"] == "closed"
    assert revived.received_at("models")  # it was probed with GET <base>/models
    assert revived.received_at("models")[0].headers["Authorization"] == f"Bearer {BACKUP_KEY}"


async def test_status_command_and_endpoint_show_no_secrets(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory({**with_targets(backup), "target_proxy": {"api_key": "sk-primary-secret-01"}})
    await chat(client, proxy)
    from_command = json.loads(proxy.master.commands.call("seaking.status"))
    from_endpoint = (await call(client, "GET", proxy.url + "/_seaking/status")).json()
    assert from_command["targets"][0]["url"] == from_endpoint["targets"][0]["url"] == upstream.url
    assert from_endpoint["targets"][0]["state"] == "closed"
    assert from_endpoint["targets"][0]["last_latency_ms"] >= 0
    assert from_endpoint["targets"][1]["state"] == "unknown"
    for secret in ("sk-primary-secret-01", BACKUP_KEY):
        assert secret not in json.dumps(from_command) and secret not in json.dumps(from_endpoint)


async def test_the_status_endpoint_needs_the_access_key_when_one_is_set(proxy_factory, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": "sk-k"}, "server": {"access_key": "open-sesame-1"}})
    assert (await call(client, "GET", proxy.url + "/_seaking/status")).status == 401
    answer = await call(client, "GET", proxy.url + "/_seaking/status", headers={"Authorization": "Bearer open-sesame-1"})
    assert answer.status == 200


# --- 5. retry budget ----------------------------------------------------------------------------------------------------------


async def test_under_a_full_outage_retries_stay_within_the_budget(proxy_factory, upstream, client):
    proxy = await proxy_factory({"retry_budget": {"percent": 10, "min_per_second": 0.2}})  # 2 retries per 10 s, +10 %
    upstream.always("chat/completions", Status(503))
    answers = [await chat(client, proxy) for _ in range(30)]
    assert all(a.status == 503 for a in answers)
    retries = len(upstream.received) - 30
    assert retries <= 2 + 3  # the floor, plus 10 % of 30 requests
    over_budget = [a for a in answers if "retry budget" in a.error["message"]]
    assert len(over_budget) >= 25
    assert sum(a.error["attempts"] == 1 for a in over_budget) >= 25  # failed at once instead of waiting


# --- 6. load balancing -----------------------------------------------------------------------------------------------------------


async def test_priority_sends_everything_to_the_first_healthy_target(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory(with_targets(backup))
    targets = [(await chat(client, proxy)).headers["x-seaking-target"] for _ in range(4)]
    assert targets == [host(upstream)] * 4


async def test_round_robin_alternates(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory(with_targets(backup, load_balancing="round_robin"))
    targets = [(await chat(client, proxy)).headers["x-seaking-target"] for _ in range(4)]
    assert targets == [host(upstream), host(backup)] * 2


async def test_weighted_follows_the_weights(proxy_factory, upstream, backup, client):
    proxy = await proxy_factory(
        {"targets": [{"url": backup.url + "/v1", "weight": 3}], "target_proxy": {"weight": 1}, "load_balancing": "weighted"}
    )
    targets = Counter([(await chat(client, proxy)).headers["x-seaking-target"] for _ in range(200)])
    assert 0.6 < targets[host(backup)] / 200 < 0.9


# --- 7. headers ---------------------------------------------------------------------------------------------------------------------


async def test_every_proxied_answer_says_where_it_came_from(proxy, upstream, client):
    upstream.script("chat/completions", Status(503), Status(401))
    failed = await chat(client, proxy)
    assert (failed.status, failed.headers["x-seaking-attempts"], failed.headers["x-seaking-model"]) == (401, "2", "model-a")
    assert failed.headers["x-seaking-target"] == host(upstream)
    models = await call(client, "GET", proxy.url + "/v1/models")
    assert models.headers["x-seaking-attempts"] == "1" and "x-seaking-model" not in models.headers
