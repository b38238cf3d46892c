"""The official `anthropic` Python SDK, pointed at the proxy, sees what Claude users should see.

A message arrives (with the proxy's access key as the SDK's api_key, in whichever header the SDK puts it); a stream retried after two 529s arrives event by
event; a stream that breaks mid-way raises `APIStatusError` carrying the proxy's message after the text that did
arrive; exhausted 529s raise `OverloadedError` once, and the upstream saw exactly the proxy's attempts, not the SDK's
two retries of each on top. Heartbeats (SSE comments) before a stream do not disturb the SDK's message accumulator.

The SDK runs in its own venv (sdk_venv.py), cached at $SEAKING_ANTHROPIC_SDK_VENV
(default ~/.cache/seaking-proxy/anthropic-sdk-venv).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cached_install import RegistryUnavailable
from seaking.lab.fault_upstream import REPLY_TEXT, Delayed, MessageStream, Status
from sdk_venv import ensure_sdk_python, run_sdk_script, venv_dir

SDK_REQUIREMENT = "anthropic>=0.50"
SDK_TIMEOUT = 10  # the SDK's own HTTP timeout: a hang shows up as APITimeoutError, not as a stuck test
ACCESS_KEY = "proxy-password-for-the-sdk"
UPSTREAM_KEY = "sk-ant-upstream-key-for-sdk-tests"

# Run by the SDK venv's python: one message (streamed with messages.stream, as the SDK's docs show), as a JSON line.
SDK_SCRIPT = r"""
import json, sys, time
import anthropic

request = json.loads(sys.argv[1])
client = anthropic.Anthropic(
    base_url=request["base_url"], api_key=request["api_key"], timeout=request["timeout"], max_retries=request["max_retries"]
)
result = {"version": anthropic.__version__, "texts": [], "text": None, "stop_reason": None, "error": None}
arguments = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
started = time.monotonic()
try:
    if request["stream"]:
        with client.messages.stream(**arguments) as stream:
            for text in stream.text_stream:
                result["texts"].append(text)
            final = stream.get_final_message()
        result["text"] = "".join(block.text for block in final.content if block.type == "text")
        result["stop_reason"] = final.stop_reason
        result["blocks"] = len(final.content)
        result["output_tokens"] = final.usage.output_tokens
    else:
        message = client.messages.create(**arguments)
        result["text"] = message.content[0].text
        result["stop_reason"] = message.stop_reason
except Exception as exc:
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    result["error"] = {
        "classes": [cls.__name__ for cls in type(exc).__mro__],
        "message": str(exc),
        "status_code": getattr(exc, "status_code", None),
        "error": error if isinstance(error, dict) else None,
    }
result["elapsed"] = time.monotonic() - started
print(json.dumps(result))
"""


@pytest.fixture
async def sdk_python() -> Path:
    try:
        return await ensure_sdk_python(venv_dir("anthropic-sdk-venv", "SEAKING_ANTHROPIC_SDK_VENV"), SDK_REQUIREMENT, "anthropic")
    except RegistryUnavailable as exc:
        pytest.skip(f"anthropic SDK not installable: {exc}")


async def sdk_message(python: Path, proxy, stream: bool, api_key: str = "sk-ant-client-key-123456", max_retries: int = 2) -> dict:
    """One message through the SDK in its venv (the SDK's default of two retries unless told otherwise)."""
    request = {"base_url": proxy.url, "api_key": api_key, "stream": stream, "timeout": SDK_TIMEOUT, "max_retries": max_retries}
    result = await run_sdk_script(python, SDK_SCRIPT, request, env_prefix="ANTHROPIC_")
    print(f"anthropic {result['version']}")
    return result


async def test_a_message_with_the_proxy_password_as_api_key(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"target_proxy": {"api_key": UPSTREAM_KEY}, "server": {"access_key": ACCESS_KEY}})
    result = await sdk_message(sdk_python, proxy, stream=False, api_key=ACCESS_KEY)
    assert result["error"] is None
    assert (result["text"], result["stop_reason"]) == (REPLY_TEXT, "end_turn")
    sent = upstream.received_at("messages")[0]
    assert sent.path == "/v1/messages"
    # The upstream key in the header the SDK used for its api_key: x-api-key up to 0.x, Authorization: Bearer in 2.x.
    credentials = {k.lower(): v for k, v in sent.headers.items() if k.lower() in ("x-api-key", "authorization")}
    assert credentials in ({"x-api-key": UPSTREAM_KEY}, {"authorization": f"Bearer {UPSTREAM_KEY}"}), credentials
    assert sent.headers["anthropic-version"]  # forwarded untouched (2023-06-01 in 0.x, newer in 2.x)


async def test_a_stream_arrives_event_by_event_after_two_529s(proxy, upstream, sdk_python):
    chunks = ["Claude", " keeps", " talking", " through", " overload"]
    upstream.script("messages", Status(529), Status(529), MessageStream(chunks=chunks, delay=0.05))
    result = await sdk_message(sdk_python, proxy, stream=True)
    assert result["error"] is None
    assert result["texts"] == chunks  # one text event per upstream delta: relayed, not buffered into one
    assert (result["text"], result["stop_reason"]) == ("".join(chunks), "end_turn")
    assert len(upstream.received_at("messages")) == 3


async def test_a_stream_dropped_mid_way_raises_api_status_error_with_the_proxys_message(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"streaming": {"resume": False}})  # the ending of a reply that cannot be continued
    upstream.script("messages", MessageStream(chunks=["Half", " a", " reply", " lost"], drop_after=2))
    result = await sdk_message(sdk_python, proxy, stream=True)
    error = result["error"]
    assert error is not None, f"the SDK ended the broken stream without an error: {result}"
    assert "APIStatusError" in error["classes"]
    # The proxy's `event: error`, read by the SDK: not a connection error of its own, nor its read timeout.
    assert error["error"]["type"] == "api_error" and error["error"]["code"] == "stream_interrupted"
    assert "dropped in the middle of the stream" in error["error"]["message"]
    assert "dropped in the middle of the stream" in error["message"]
    assert result["texts"] == ["Half", " a"]
    assert result["elapsed"] < SDK_TIMEOUT / 2
    assert len(upstream.received_at("messages")) == 1  # content was sent: a retry would repeat it


async def test_a_dropped_stream_continued_by_the_proxy_accumulates_into_one_message(proxy, upstream, sdk_python):
    words = ["Claude", " picks", " up", " where", " the", " stream", " broke", " off."]
    upstream.script("messages", MessageStream(chunks=words, drop_after=3), MessageStream(chunks=words))
    result = await sdk_message(sdk_python, proxy, stream=True)
    assert result["error"] is None, result
    assert (result["text"], result["stop_reason"], result["blocks"]) == ("".join(words), "end_turn", 1)
    assert result["output_tokens"] == len(words)  # both parts
    assert len(upstream.received_at("messages")) == 2


async def test_exhausted_529s_raise_overloaded_error_once(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"error_handling": {"max_retries": 2}})
    upstream.always("messages", Status(529))
    for stream in (False, True):
        result = await sdk_message(sdk_python, proxy, stream=stream)
        error = result["error"]
        assert error is not None and "OverloadedError" in error["classes"] and error["status_code"] == 529
        assert error["error"]["type"] == "overloaded_error" and error["error"]["attempts"] == 3
        assert "gave up after 3 attempts" in error["error"]["message"]
    # The proxy's 3 attempts per call, and nothing on top: without x-should-retry: false the SDK would have sent each
    # call three times, and the upstream would have seen 9 attempts per call.
    assert len(upstream.received_at("messages")) == 2 * 3


async def test_heartbeats_before_the_stream_do_not_disturb_the_sdk(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"streaming": {"heartbeat_interval": 0.2}})
    upstream.script("messages", Delayed(0.9, then=MessageStream()))
    result = await sdk_message(sdk_python, proxy, stream=True)
    assert result["error"] is None
    assert (result["text"], result["stop_reason"]) == (REPLY_TEXT, "end_turn")
    assert proxy.flows[-1].response.headers["content-type"].startswith("text/event-stream")  # committed with heartbeats
