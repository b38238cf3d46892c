"""Tokens counted: the usage the upstream reported (JSON and streams, OpenAI's and Anthropic's shapes) in
seaking_tokens_total{kind, target, model}, in the client flow's comment, and per target in /_seaking/status — with
the model label bounded to models the upstream listed or the config names."""

from __future__ import annotations

from conftest import CHAT, call, chat
from seaking.lab.fault_upstream import MessageStream, Stream
from test_anthropic import MESSAGE, messages, read_events
from test_metrics import scrape
from test_streaming import STREAM_CHAT, read_stream


async def tokens(client, proxy) -> dict[tuple[str, str, str], float]:
    samples = await scrape(client, proxy)
    return {
        (found["kind"], found["target"], found["model"]): value
        for (name, labels), value in samples.items() if name == "seaking_tokens_total" for found in [dict(labels)]
    }


async def test_tokens_of_json_and_streams_both_apis(proxy_factory, upstream, client):
    proxy = await proxy_factory({"models": {"fallback": ["model-a", "claude-test"]}})
    target = f"127.0.0.1:{upstream.port}"
    await chat(client, proxy)  # usage 1 → 3
    upstream.script("chat/completions", Stream(usage=True))  # a usage chunk at its end: 5 → 3
    await read_stream(client, proxy)
    await read_stream(client, proxy)  # no usage chunk: nothing counted
    await messages(client, proxy, MESSAGE)  # 5 → 3
    upstream.script("messages", MessageStream(chunks=["a", "b", "c", "d"]))  # message_start 5, message_delta 4
    await read_events(client, proxy)
    last_message = [f for f in proxy.flows if f.request.path == "/v1/messages"][-1]
    assert last_message.comment.startswith("1 attempt: 200 in ") and last_message.comment.endswith(", 5 → 4 tokens")
    assert await tokens(client, proxy) == {
        ("prompt", target, "model-a"): 1 + 5, ("completion", target, "model-a"): 3 + 3,
        ("prompt", target, "claude-test"): 5 + 5, ("completion", target, "claude-test"): 3 + 4,
    }
    status = (await call(client, "GET", proxy.url + "/_seaking/status")).json()
    assert status["targets"][0]["tokens"] == {"prompt": 16, "completion": 13}


async def test_made_up_model_names_do_not_grow_the_metrics(proxy, upstream, client):
    for n in range(30):
        await chat(client, proxy, {**CHAT, "model": f"made-up-{n}"})
    labels = await tokens(client, proxy)
    assert {model for _, _, model in labels} == {"other"}
    assert labels[("prompt", f"127.0.0.1:{upstream.port}", "other")] == 30


async def test_models_the_upstream_listed_keep_their_name(proxy, upstream, client):
    await call(client, "GET", proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-client-key-123456"})
    await chat(client, proxy, {**CHAT, "model": "model-b"})  # listed by the upstream
    await chat(client, proxy, {**CHAT, "model": "model-z"})  # not
    assert {model for _, _, model in await tokens(client, proxy)} == {"model-b", "other"}


async def test_what_the_client_asked_for_is_not_changed_to_get_usage(proxy, upstream, client):
    await read_stream(client, proxy, STREAM_CHAT)
    assert "stream_options" not in upstream.received[-1].json()
