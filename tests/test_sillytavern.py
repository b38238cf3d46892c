"""End to end: a real SillyTavern 1.19.0 talks to the proxy, which fronts the fault-injecting upstream.

SillyTavern's own backend API is driven as its browser page drives it (tests/sillytavern.py), with the Custom
(OpenAI-compatible) source pointed at `proxy.url + "/v1"`, and with the Claude source using the proxy as its reverse
proxy (with a proxy password), so what these tests assert is what a SillyTavern user gets: the model list after
"Connect", the reply text, and the error message the page shows.

One SillyTavern process serves the whole module. Its client session is bound to the event loop it started in, so the
tests, and the upstream and proxy fixtures they use, run in one module-wide loop: the conftest fixtures of the same
names run in per-test loops (asyncio_default_fixture_loop_scope = function), where an upstream or a proxy could not
serve a request made from the module's loop. They are redeclared below from the same context managers.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_asyncio

from conftest import running_proxies
from seaking.lab.fault_upstream import MODEL_IDS, REPLY_TEXT, FaultyUpstream, MessageStream, Status, Stream, split_words
from seaking.lab.harness import running_upstreams
from sillytavern import VERSION, SillyTavern, SillyTavernUnavailable, ensure_installed

pytestmark = pytest.mark.asyncio(loop_scope="module")

ST_KEY = "sk-st-e2e-key-123456"  # stored in SillyTavern: it sends "Bearer <key>", not "Bearer undefined"
PROXY_KEY = "sk-proxy-held-key-987654"
GENERATE_TIMEOUT = 15  # seconds for one whole SillyTavern reply; every test here needs well under 2


# --- fixtures: one SillyTavern for the module, a fresh upstream and proxy per test, all in the module's loop ---------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sillytavern(tmp_path_factory):
    try:
        await ensure_installed()
    except SillyTavernUnavailable as error:
        pytest.skip(f"SillyTavern {VERSION} could not be installed: {error}")
    async with SillyTavern(tmp_path_factory.mktemp("sillytavern")) as st:
        await st.store_key(ST_KEY)
        yield st


@pytest_asyncio.fixture(loop_scope="module")
async def upstream():
    async with running_upstreams() as start:
        yield await start()


@pytest_asyncio.fixture(loop_scope="module")
async def proxy_factory(tmp_path, upstream):
    async with running_proxies(tmp_path, upstream.url) as start:
        yield start


@pytest_asyncio.fixture(loop_scope="module")
async def proxy(proxy_factory):
    return await proxy_factory()


# --- reading SillyTavern's answers ------------------------------------------------------------------------------------


def sse_events(body: bytes) -> list:
    """The `data:` events of an SSE body as SillyTavern's page splits them: JSON documents, and "[DONE]"."""
    events = []
    for line in body.decode().splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e.get("choices")
    )


def shown_error(status: int, reason: str, body: bytes) -> str:
    """The error text SillyTavern 1.19's page toasts for this answer of its server.

    As getChatCompletionErrorMessage in public/scripts/openai.js: the body's error (a string, or its message, code or
    type), else the status line's reason phrase if the status is not 2xx. For a failed non-streaming call SillyTavern's
    server answers 200 {"error": {"message": <upstream reason phrase>}, "quota_error": false}; for a failed stream it
    copies the upstream's status (401 becomes 400), reason phrase and body.
    """
    document = json.loads(body)
    error = document.get("error")
    if isinstance(error, dict):
        error = error.get("message") or error.get("code") or error.get("type")
    return str(error or (reason if status >= 300 else "") or "Unknown error")


def model_ids(listing) -> list[str]:
    assert isinstance(listing, dict) and isinstance(listing.get("data"), list), listing
    return [model["id"] for model in listing["data"]]


def authorizations(upstream: FaultyUpstream, endpoint: str) -> set[str]:
    return {r.headers.get("Authorization") for r in upstream.received_at(endpoint)}


def custom_url(proxy) -> str:
    return proxy.url + "/v1"


# --- tests ----------------------------------------------------------------------------------------------------------


async def test_connect_lists_models_through_the_proxy_and_from_its_cache_when_upstream_is_down(
    sillytavern, upstream, proxy
):
    status, listing = await sillytavern.list_models(custom_url(proxy))
    assert status == 200, sillytavern.log_tail()
    assert model_ids(listing) == list(MODEL_IDS)
    assert authorizations(upstream, "models") == {f"Bearer {ST_KEY}"}

    upstream.always("models", Status(503))
    status, listing = await sillytavern.list_models(custom_url(proxy))
    # Without the proxy SillyTavern answers {"error": true, "data": {"data": []}} here: an empty model list.
    assert status == 200, sillytavern.log_tail()
    assert "error" not in listing
    assert model_ids(listing) == list(MODEL_IDS)
    assert len(upstream.received_at("models")) > 1, "the second Connect must have asked the upstream again"
    last_models_flow = [f for f in proxy.flows if f.request.path.endswith("/models")][-1]
    assert last_models_flow.response.headers["x-seaking-cache"].startswith("stale")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_reply_arrives_after_two_upstream_503s(sillytavern, upstream, proxy, stream):
    upstream.script("chat/completions", Status(503), Status(503))

    status, _, body = await sillytavern.generate(custom_url(proxy), stream=stream, timeout=GENERATE_TIMEOUT)

    assert status == 200, (body, sillytavern.log_tail())
    if stream:
        events = sse_events(body)
        assert streamed_text(events) == REPLY_TEXT
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events)
    else:
        assert json.loads(body)["choices"][0]["message"]["content"] == REPLY_TEXT
    requests = upstream.received_at("chat/completions")
    assert len(requests) == 3
    assert authorizations(upstream, "chat/completions") == {f"Bearer {ST_KEY}"}
    assert requests[-1].json()["stream"] is stream


async def test_mid_stream_drop_ends_sillytaverns_reply_with_the_proxys_error(sillytavern, upstream, proxy):
    upstream.script("chat/completions", Stream(drop_after=2))

    # SillyTavern sets no timeout of its own: pointed straight at this upstream, it never ends its reply when the
    # connection drops mid-stream (the harness author measured it, and it was re-checked for this test: its reply was
    # still open after 15 s), so the user's chat hangs until a page reload. Through the proxy the reply must end.
    started = time.monotonic()
    status, _, body = await sillytavern.generate(custom_url(proxy), stream=True, timeout=GENERATE_TIMEOUT)
    elapsed = time.monotonic() - started

    assert elapsed < 5, f"SillyTavern's reply took {elapsed:.1f} s to end"
    assert status == 200, (body, sillytavern.log_tail())
    events = sse_events(body)
    assert streamed_text(events) == "Hello from", events  # the two chunks sent before the drop
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, events
    assert errors[0]["code"] == "stream_interrupted"
    # SillyTavern's page toasts the message of an error event and keeps the text received before it.
    assert "dropped in the middle of the stream" in errors[0]["message"]
    assert events[-1] == "[DONE]"
    assert len(upstream.received_at("chat/completions")) == 1  # text was already sent: no retry
    assert authorizations(upstream, "chat/completions") == {f"Bearer {ST_KEY}"}


LONG_REPLY = "Once upon a time a fox lived at the edge of a wood, and every morning it ran to the river and back."


async def test_a_dropped_reply_is_continued_and_sillytavern_shows_it_whole(sillytavern, upstream, proxy_factory):
    """The Custom source with an upstream that takes an assistant prefill (OpenRouter, local servers)."""
    proxy = await proxy_factory({"target_proxy": {"prefill": "assistant"}})
    words = split_words(LONG_REPLY)
    upstream.script("chat/completions", Stream(chunks=words, drop_after=7), Stream(chunks=words))
    status, _, body = await sillytavern.generate(custom_url(proxy), stream=True, timeout=GENERATE_TIMEOUT)
    assert status == 200, (body, sillytavern.log_tail())
    events = sse_events(body)
    assert streamed_text(events) == LONG_REPLY
    assert not any(isinstance(e, dict) and "error" in e for e in events) and events[-1] == "[DONE]"
    continuation = upstream.received_at("chat/completions")[1].json()["messages"][-1]
    assert continuation == {"role": "assistant", "content": "".join(words[:7])}


INVALID_KEY = {
    "error": {
        "message": "Incorrect API key provided: sk-st-e2e***3456. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_rejected_key_fails_fast_with_the_upstreams_message(sillytavern, upstream, proxy, stream):
    upstream.always("chat/completions", Status(401, INVALID_KEY))

    status, reason, body = await sillytavern.generate(custom_url(proxy), stream=stream, timeout=GENERATE_TIMEOUT)

    shown = shown_error(status, reason, body)
    # Non-streaming, SillyTavern passes on only the upstream's reason phrase: without the proxy its user reads
    # "Unauthorized". Streaming, its page reads the body, which already said why; the reason phrase does too now.
    assert "Incorrect API key" in shown, (shown, sillytavern.log_tail())
    if stream:
        assert status == 400  # SillyTavern's own change of 401, so that its page's Basic auth is not reset
        assert "Incorrect API key" in reason
        assert json.loads(body)["error"]["code"] == "invalid_api_key"  # the upstream's error, passed on unchanged
    else:
        assert status == 200
        assert set(json.loads(body)) == {"error", "quota_error"}
    assert len(upstream.received_at("chat/completions")) == 1  # a 401 is not retried
    assert authorizations(upstream, "chat/completions") == {f"Bearer {ST_KEY}"}


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_retries_exhausted_says_how_many_attempts(sillytavern, upstream, proxy_factory, stream):
    proxy = await proxy_factory({"error_handling": {"max_retries": 2, "base_delay": 0.01, "max_delay": 0.02}})
    upstream.always("chat/completions", Status(503))

    started = time.monotonic()
    status, reason, body = await sillytavern.generate(custom_url(proxy), stream=stream, timeout=GENERATE_TIMEOUT)
    elapsed = time.monotonic() - started

    assert elapsed < 5, f"giving up took {elapsed:.1f} s"
    shown = shown_error(status, reason, body)
    # Without the proxy SillyTavern shows "Service Unavailable" (non-streaming) or the upstream's "upstream status 503".
    assert "503" in shown and "gave up after 3 attempts" in shown, (shown, sillytavern.log_tail())
    if stream:
        assert status == 503  # nothing was streamed yet: the proxy's JSON error, its status copied by SillyTavern
        assert json.loads(body)["error"]["code"] == "upstream_http_503"
    else:
        assert status == 200
    assert len(upstream.received_at("chat/completions")) == 3
    assert authorizations(upstream, "chat/completions") == {f"Bearer {ST_KEY}"}


async def test_key_held_by_the_proxy_replaces_sillytaverns(sillytavern, upstream, proxy_factory):
    proxy = await proxy_factory({"target_proxy": {"api_key": PROXY_KEY}})

    status, listing = await sillytavern.list_models(custom_url(proxy))
    assert status == 200 and model_ids(listing) == list(MODEL_IDS), sillytavern.log_tail()
    status, _, body = await sillytavern.generate(custom_url(proxy), stream=True, timeout=GENERATE_TIMEOUT)
    assert status == 200 and streamed_text(sse_events(body)) == REPLY_TEXT, (body, sillytavern.log_tail())

    assert authorizations(upstream, "models") == {f"Bearer {PROXY_KEY}"}
    assert authorizations(upstream, "chat/completions") == {f"Bearer {PROXY_KEY}"}


# --- the Claude source, with the proxy as its reverse proxy -------------------------------------------------------------

PROXY_PASSWORD = "st-claude-proxy-password"  # SillyTavern sends it as x-api-key; the proxy's access key
CLAUDE_PROXY = {"target_proxy": {"api_key": PROXY_KEY}, "server": {"access_key": PROXY_PASSWORD}}


def claude_text(events: list) -> str:
    """What SillyTavern's page makes of a Claude stream: delta.text of every event."""
    return "".join(e.get("delta", {}).get("text", "") for e in events if isinstance(e, dict))


def assert_claude_requests(upstream: FaultyUpstream, count: int) -> None:
    """SillyTavern's Claude requests, as the upstream saw them: the proxy's key as x-api-key, Anthropic's headers."""
    requests = upstream.received_at("messages")
    assert len(requests) == count
    for request in requests:
        assert request.path == "/v1/messages"
        assert request.headers["x-api-key"] == PROXY_KEY and "Authorization" not in request.headers
        assert request.headers["anthropic-version"] == "2023-06-01"
        assert "output-128k-2025-02-19" in request.headers["anthropic-beta"]


@pytest.mark.parametrize(
    ("stream", "url_suffix"),
    [(False, ""), (True, ""), (True, "/v1/")],
    ids=["non-streaming", "streaming", "streaming-v1-slash"],
)
async def test_claude_reply_arrives_after_two_529s(sillytavern, upstream, proxy_factory, stream, url_suffix):
    proxy = await proxy_factory(CLAUDE_PROXY)
    upstream.script("messages", Status(529), Status(529))

    # The reverse proxy URL as users type it: SillyTavern appends "/messages", so these arrive as //messages and
    # /v1//messages.
    status, _, body = await sillytavern.generate_claude(
        proxy.url + url_suffix, PROXY_PASSWORD, stream=stream, timeout=GENERATE_TIMEOUT
    )

    assert status == 200, (body, sillytavern.log_tail())
    if stream:
        events = sse_events(body)
        assert claude_text(events) == REPLY_TEXT
        assert events[-1] == {"type": "message_stop"}
        assert not any("error" in e for e in events)
    else:
        assert json.loads(body)["choices"][0]["message"]["content"] == REPLY_TEXT
    assert_claude_requests(upstream, 3)


async def test_claude_mid_stream_drop_ends_the_reply_with_the_proxys_error(sillytavern, upstream, proxy_factory):
    proxy = await proxy_factory({**CLAUDE_PROXY, "streaming": {"resume": False}})  # a reply that cannot be continued
    upstream.script("messages", MessageStream(drop_after=2))

    started = time.monotonic()
    status, _, body = await sillytavern.generate_claude(proxy.url, PROXY_PASSWORD, stream=True, timeout=GENERATE_TIMEOUT)

    assert time.monotonic() - started < 5
    assert status == 200, (body, sillytavern.log_tail())
    events = sse_events(body)
    assert claude_text(events) == "Hello from"
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1 and errors[0]["type"] == "api_error"
    # SillyTavern's page toasts error.message of an event that carries an error, and keeps the text before it.
    assert "dropped in the middle of the stream" in errors[0]["message"]
    assert b"event: error\n" in body and b"[DONE]" not in body
    assert_claude_requests(upstream, 1)


async def test_a_dropped_claude_reply_is_continued_and_sillytavern_shows_it_whole(sillytavern, upstream, proxy_factory):
    proxy = await proxy_factory(CLAUDE_PROXY)
    words = split_words(LONG_REPLY)
    upstream.script("messages", MessageStream(chunks=words, drop_after=6), MessageStream(chunks=words))
    status, _, body = await sillytavern.generate_claude(proxy.url, PROXY_PASSWORD, stream=True, timeout=GENERATE_TIMEOUT)
    assert status == 200, (body, sillytavern.log_tail())
    events = sse_events(body)
    assert claude_text(events) == LONG_REPLY and not [e for e in events if "error" in e]
    assert_claude_requests(upstream, 2)


async def test_claude_wrong_proxy_password_is_shown_when_streaming(sillytavern, upstream, proxy_factory):
    proxy = await proxy_factory(CLAUDE_PROXY)
    status, reason, body = await sillytavern.generate_claude(proxy.url, "wrong-password", stream=True, timeout=GENERATE_TIMEOUT)
    assert status == 400  # SillyTavern's own change of 401
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert "access key" in shown_error(status, reason, body)
    assert upstream.received == []


async def test_claude_non_streaming_failure_reaches_the_page_only_as_an_internal_server_error(
    sillytavern, upstream, proxy_factory
):
    proxy = await proxy_factory(CLAUDE_PROXY)
    upstream.always("messages", Status(529))
    status, _, body = await sillytavern.generate_claude(proxy.url, PROXY_PASSWORD, stream=False, timeout=GENERATE_TIMEOUT)
    # SillyTavern logs the upstream's error and tells its page only this, whatever the proxy said: for a
    # non-streaming Claude call, retrying before giving up is all the proxy can do.
    assert (status, json.loads(body)) == (500, {"error": True})
    assert_claude_requests(upstream, 4)
