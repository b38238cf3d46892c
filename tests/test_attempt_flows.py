"""Every upstream attempt as a flow of its own, and what mitmweb's list says about a client flow at a glance."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from conftest import CHAT, chat
from seaking.lab.fault_upstream import Hang, Reset, Status, Stream
from seaking.attempt_flows import describe_attempt
from seaking.flows import upstream_server
from seaking.flow_notes import describe_history, notes
from seaking.records import AttemptRecord, FlowRecord
from test_streaming import STREAM_CHAT, read_stream

CLIENT_KEY = "sk-client-key-123456"
UPSTREAM_KEY = "sk-upstream-key-7890abcdef"


def record(flow) -> dict:
    return flow.metadata["seaking"]


def attempts_of(proxy, flow) -> list:
    return sorted((f for f in proxy.attempt_flows if record(f)["attempt_of"] == flow.id), key=lambda f: record(f)["attempt"])


async def test_each_attempt_is_a_flow_with_what_was_sent_and_what_came_back(proxy, upstream, client):
    busy = {"error": {"message": "overloaded, come back later", "type": "server_error"}}
    upstream.script("chat/completions", Status(503, body=busy, headers={"Retry-After": "0"}), Status(502))
    answer = await chat(client, proxy)
    assert answer.status == 200
    [flow] = proxy.flows
    first, second, third = attempts = attempts_of(proxy, flow)
    assert [a.response.status_code for a in attempts] == [503, 502, 200]
    for number, attempt in enumerate(attempts, 1):
        assert not attempt.live
        assert attempt.request.url == upstream.url + "/v1/chat/completions"
        assert attempt.request.headers["authorization"] == "Bearer [redacted]"
        assert json.loads(attempt.request.content) == CHAT
        assert attempt.server_conn.address == ("127.0.0.1", upstream.port)
        assert record(attempt)["attempt"] == number and record(attempt)["attempt_of"] == flow.id
        assert record(attempt)["target"] == f"127.0.0.1:{upstream.port}" and record(attempt)["model"] == "model-a"
        assert record(flow)["attempts"][number - 1]["flow"] == attempt.id
        assert flow.request.timestamp_start <= attempt.request.timestamp_start <= attempt.response.timestamp_start
        assert attempt.response.timestamp_start <= attempt.response.timestamp_end
    assert first.response.headers["retry-after"] == "0"
    assert json.loads(first.response.content) == busy
    assert first.request.timestamp_start < second.request.timestamp_start < third.request.timestamp_start
    assert [record(a)["verdict"] for a in attempts] == ["retry", "retry", "success"]
    assert record(first)["wait_before"] == 0 and record(third)["wait_before"] >= 0
    assert first.comment.startswith("attempt 1 of 3: 503 → retry (upstream answered 503")
    assert first.marked == ":arrow_right_hook:"
    assert len(upstream.received) == 3  # the attempt flows went through the addons, but none of them went upstream


async def test_an_upstream_that_echoes_the_key_in_a_header_shows_it_scrubbed(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}})
    upstream.script("chat/completions", Status(401, headers={"X-Debug": f"rejected key {UPSTREAM_KEY}"}))
    assert (await chat(client, proxy)).status == 401
    [attempt] = attempts_of(proxy, proxy.flows[0])
    assert attempt.response.headers["x-debug"] == "rejected key [redacted]"
    assert proxy.flows[0].response.headers["x-debug"] == "rejected key [redacted]"  # what the client got, too
    upstream.script("chat/completions", Stream(headers={"X-Debug": f"served with key {UPSTREAM_KEY}"}))
    async with client.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
        assert streamed.headers["x-debug"] == "served with key [redacted]" and b"[DONE]" in await streamed.read()


async def test_failed_connections_are_the_attempt_flows_error(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"timeout": 0.3}, "error_handling": {"hedge_on_timeout": False}})
    upstream.script("chat/completions", Reset(), Hang())
    assert (await chat(client, proxy)).status == 200
    reset, hang, good = attempts_of(proxy, proxy.flows[-1])
    assert reset.response is None and reset.error.msg == "upstream closed the connection without answering"
    assert hang.response is None and hang.error.msg == "no response from upstream in time"
    assert hang.error.timestamp - hang.request.timestamp_start >= 0.25
    assert good.error is None and good.response.status_code == 200


async def test_the_relayed_stream_shows_all_it_sent_and_how_it_broke(proxy, upstream, client):
    upstream.script("chat/completions", Status(503), Stream(chunks=["a", "b", "c"], drop_after=2))
    read = await read_stream(client, proxy)
    assert read.errors and read.errors[0]["code"] == "stream_interrupted"
    refused, relayed = attempts_of(proxy, proxy.flows[-1])
    assert refused.response.status_code == 503
    events = [line for line in relayed.response.content.split(b"\n\n") if line.startswith(b"data: ")]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events] == ["a", "b"]
    assert relayed.response.headers["content-type"] == "text/event-stream"
    assert relayed.error.msg.startswith("upstream connection dropped in the middle of the stream")
    assert record(relayed)["stream_error"] == "stream_interrupted"


async def test_a_stream_judged_at_its_first_event_shows_what_was_read(proxy, upstream, client):
    upstream.script("chat/completions", Stream(error_first="model is loading"))
    read = await read_stream(client, proxy)
    assert read.text
    broken, good = attempts_of(proxy, proxy.flows[-1])
    assert b"model is loading" in broken.response.content
    assert record(broken)["verdict"] == "retry" and broken.error is None
    assert b"[DONE]" in good.response.content and good.error is None


async def test_attempts_to_other_targets_and_models_show_where_they_went(proxy_factory, upstream, upstream_factory, client):
    backup = await upstream_factory()
    proxy = await proxy_factory(
        {"targets": [{"url": backup.url + "/v1"}], "model_fallbacks": {"model-a": ["model-b"]}, "error_handling": {"max_retries": 1}}
    )
    upstream.always("chat/completions", Status(503))
    backup.script("chat/completions", Status(503))
    assert (await chat(client, proxy)).status == 200
    flow = proxy.flows[-1]
    attempts = attempts_of(proxy, flow)
    where = [(a.request.port, json.loads(a.request.content)["model"], a.response.status_code) for a in attempts]
    assert where == [(upstream.port, "model-a", 503), (backup.port, "model-a", 503), (upstream.port, "model-b", 503),
                     (backup.port, "model-b", 200)]
    assert flow.request.port == backup.port and flow.server_conn.address == ("127.0.0.1", backup.port)


async def test_a_client_that_leaves_still_shows_the_attempts_made(proxy, upstream):
    upstream.script("chat/completions", Status(503), Hang())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await chat(impatient, proxy)
    for _ in range(100):
        if proxy.flows:
            break
        await asyncio.sleep(0.05)
    [refused] = attempts_of(proxy, proxy.flows[-1])
    assert refused.response.status_code == 503


async def test_attempt_flows_can_be_turned_off(proxy_factory, upstream, client):
    proxy = await proxy_factory(seaking_attempt_flows=False)
    upstream.script("chat/completions", Status(503))
    await read_stream(client, proxy, STREAM_CHAT)
    await chat(client, proxy)
    assert len(proxy.flows) == 2 and proxy.attempt_flows == []


async def test_without_a_flow_list_or_a_recording_no_attempt_flows_are_made(proxy_factory, upstream, client, tmp_path):
    """Plain mitmdump shows nobody a flow: attempt flows would cost CPU for nothing. With -w they are recorded."""
    unseen = await proxy_factory(flow_list=False)
    upstream.script("chat/completions", Status(503))
    await chat(client, unseen)
    assert len(unseen.flows) == 1 and unseen.attempt_flows == []
    recorded = await proxy_factory(flow_list=False, save_stream_file=str(tmp_path / "flows.mitm"))
    upstream.script("chat/completions", Status(503))
    await chat(client, recorded)
    assert [f.response.status_code for f in recorded.attempt_flows] == [503, 200]


async def test_a_streamed_flow_shows_the_upstream_not_the_relay(proxy, upstream, client):
    await read_stream(client, proxy)
    flow = proxy.flows[-1]
    relay_port = proxy.shared.relay.port
    assert flow.server_conn.address == ("127.0.0.1", upstream.port)
    assert flow.server_conn.peername is None  # the relay's is not shown
    assert relay_port not in (flow.request.port, flow.server_conn.address[1])


# --- the comment and mark, from the record alone ----------------------------------------------------------------------


def attempt(label, target="a.example", model="m", verdict="retry") -> dict:
    return {"label": label, "target": target, "model": model, "verdict": verdict}


def noted(flow_record: dict) -> tuple[str, str]:
    return notes(FlowRecord.from_metadata(flow_record))


def test_a_retried_success_lists_every_attempt():
    flow_record = {"attempts": [attempt("timeout"), attempt("200", verdict="success")], "elapsed": 5.04,
                   "answered_by": "upstream", "verdict": "success", "status": 200}
    assert noted(flow_record) == (":repeat:", "2 attempts: timeout, 200 in 5.0 s")


def test_giving_up_is_a_failure_and_counts_every_attempt():
    flow_record = {"attempts": [attempt("503")] * 4, "elapsed": 0.71, "answered_by": "seaking-proxy",
                   "verdict": "retry", "status": 502}
    assert noted(flow_record) == (":x:", "4 attempts: 503 ×4 → gave up (502 by seaking-proxy) in 0.7 s")


def test_models_from_the_cache_say_so():
    flow_record = {"attempts": [attempt("503")] * 4, "elapsed": 0.7, "answered_by": "models cache",
                   "verdict": "retry", "status": 200}
    assert noted(flow_record) == (":repeat:", "4 attempts: 503 ×4 → models from cache in 0.7 s")


def test_a_stream_ended_with_an_error_puts_the_failure_first():
    dropped = {"attempts": [attempt("200", verdict="success")], "elapsed": 0.04, "answered_by": "upstream",
               "verdict": "success", "status": 200, "stream_error": "stream_interrupted", "reply_chars": 1412,
               "duration": 3.14}
    assert noted(dropped) == (":x:", "1 attempt: 200, stream broke after 1,412 chars in 3.1 s (stream_interrupted)")
    behind_heartbeats = {"attempts": [attempt("503")] * 2, "elapsed": 31.0, "answered_by": "seaking-proxy",
                         "verdict": "retry", "status": 200, "stream_error": "upstream_http_503"}
    assert noted(behind_heartbeats) == (":x:", "2 attempts: 503, 503 → gave up in 31.0 s (upstream_http_503)")


def test_a_first_time_answer_needs_no_note():
    flow_record = {"attempts": [attempt("401", verdict="fail_fast")], "elapsed": 0.1, "answered_by": "upstream",
                   "verdict": "fail_fast", "status": 401}
    assert noted(flow_record) == ("", "")


def test_several_targets_and_models_are_named_per_attempt():
    attempts = [attempt("503", "a.example", "big"), attempt("503", "b.example", "big"), attempt("200", "b.example", "small")]
    assert describe_history([AttemptRecord.from_metadata(a) for a in attempts], 0.3) == "3 attempts: 503 a.example big, 503 b.example big, 200 b.example small in 0.3 s"


def test_an_attempt_flow_says_which_attempt_it_was_and_why_it_was_retried():
    summary = AttemptRecord.from_metadata({"label": "503", "verdict": "retry", "detail": "upstream answered 503", "wait_before": 0.42})
    assert describe_attempt(summary, 2, 4, "→ retry") == "attempt 2 of 4: 503 → retry (upstream answered 503) after waiting 0.4 s"
    assert describe_attempt(summary, 4, 4, "→ gave up").startswith("attempt 4 of 4: 503 → gave up (upstream answered 503)")


@pytest.mark.parametrize(
    ("url", "address", "sni"),
    [
        ("https://api.example/v1", ("api.example", 443), "api.example"),
        ("http://127.0.0.1:8000/v1", ("127.0.0.1", 8000), None),
    ],
)
def test_an_attempt_shows_the_upstream_it_went_to_as_mitmweb_shows_a_server(url, address, sni):
    server = upstream_server(url)
    assert (server.address, server.sni) == (address, sni)
