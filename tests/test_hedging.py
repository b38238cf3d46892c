"""Hedging on a per-try timeout (Envoy's hedge_on_per_try_timeout): an attempt past target_proxy.timeout (no headers) or
streaming.first_event_timeout (no first content) keeps running while the next starts beside it; the first good answer
wins, every other is closed at once, and the open ones are waited for until the deadline."""

from __future__ import annotations

import asyncio
import time

from conftest import chat
from seaking.lab.fault_upstream import REPLY_TEXT, Delayed, Hang, Stream
from test_streaming import read_stream

SLOW_FIRST = {"target_proxy": {"timeout": 1}}  # conftest's FAST_POLICY has the short back-off


async def until_disconnected(upstream, count: int) -> None:
    async with asyncio.timeout(2):
        while sum(r.disconnected_at is not None for r in upstream.received) < count:
            await asyncio.sleep(0.02)


async def test_the_slow_first_attempt_answers_instead_of_being_thrown_away(proxy_factory, upstream, client):
    proxy = await proxy_factory(SLOW_FIRST)
    upstream.script("chat/completions", Delayed(2.5), Hang(), Hang(), Hang())
    started = time.monotonic()
    answer = await chat(client, proxy)
    took = time.monotonic() - started
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"] == REPLY_TEXT
    assert 2.4 < took < 3.4, took  # the first attempt's answer at 2.5 s, not a 504 after four attempts
    assert len(upstream.received) == 3  # hedges started at 1 s and at 2 s
    await until_disconnected(upstream, 2)  # and both closed when the first one answered
    attempts = proxy.flows[-1].metadata["seaking"]["attempts"]
    assert [(a["label"], a["verdict"], a.get("hedged", False)) for a in attempts] == [
        ("200", "success", True), ("timeout", "retry", True), ("timeout", "retry", False),
    ]
    assert attempts[1]["detail"] == attempts[2]["detail"] == "closed: attempt 1 answered first"
    won, *closed = sorted(proxy.attempt_flows, key=lambda f: f.metadata["seaking"]["attempt"])
    assert won.comment.startswith("attempt 1 of 3: 200 → success, answered first")
    assert [f.comment.split(" (")[0] for f in closed] == ["attempt 2 of 3: timeout → closed", "attempt 3 of 3: timeout → closed"]


async def test_without_hedging_the_slow_attempt_is_abandoned(proxy_factory, upstream, client):
    proxy = await proxy_factory({**SLOW_FIRST, "error_handling": {"hedge_on_timeout": False, "max_retries": 1}})
    upstream.script("chat/completions", Delayed(2.5), Hang())
    answer = await chat(client, proxy)
    assert answer.status == 504 and len(upstream.received) == 2


async def test_a_stream_whose_first_event_is_late_wins_over_its_hedges(proxy_factory, upstream, client):
    proxy = await proxy_factory({**SLOW_FIRST, "streaming": {"first_event_timeout": 1}})
    upstream.script("chat/completions", Stream(first_event_after=2.5), Stream(first_event_after=60), Stream(first_event_after=60))
    started = time.monotonic()
    read = await read_stream(client, proxy)
    assert read.text == REPLY_TEXT and read.errors == []
    first_data = next(t for t, line in read.lines if line.startswith(b"data:"))
    assert 2.4 < first_data < 3.4 and time.monotonic() - started < 4
    assert len(upstream.received) == 3
    await until_disconnected(upstream, 2)


async def test_a_later_attempt_may_win_too(proxy_factory, upstream, client):
    proxy = await proxy_factory(SLOW_FIRST)
    upstream.script("chat/completions", Hang(), Delayed(0.2))
    started = time.monotonic()
    assert (await chat(client, proxy)).status == 200
    assert 1.1 < time.monotonic() - started < 2  # the hedge at 1 s answered 0.2 s later
    await until_disconnected(upstream, 1)  # the first one closed
    attempts = proxy.flows[-1].metadata["seaking"]["attempts"]
    assert [a["verdict"] for a in attempts] == ["retry", "success"]
    assert attempts[0]["detail"] == "closed: attempt 2 answered first"
    hedged, won = sorted(proxy.attempt_flows, key=lambda f: f.metadata["seaking"]["attempt"])
    assert hedged.comment.endswith("→ closed (attempt 2 answered first)") and hedged.error.msg.startswith("closed: attempt 2")
    assert won.comment.startswith("attempt 2 of 2: 200 → success, answered first")


async def test_an_upstream_that_never_answers_gets_504s_within_the_deadline(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 0.2}, "error_handling": {"deadline": 2, "max_retries": 3}})
    upstream.always("chat/completions", Hang())
    started = time.monotonic()
    answers = await asyncio.gather(*(chat(client, proxy) for _ in range(10)))
    assert time.monotonic() - started < 3.5
    assert [a.status for a in answers] == [504] * 10
    assert all(a.error["code"] == "upstream_timeout" and "2 s deadline" in a.error["message"] for a in answers)
    assert len(upstream.received) <= 10 * 4  # at most max_retries + 1 attempts each
    await until_disconnected(upstream, len(upstream.received))  # none left open
