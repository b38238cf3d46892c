"""The official `openai` Python SDK, pointed at the proxy, sees what its users should see.

The other tests read the proxy's bytes with aiohttp; these prove that the most common real client understands them:
a stream retried after 503s arrives whole, a stream that breaks mid-way ends in an `openai.APIError` carrying the
proxy's message after the text that did arrive (and without hanging) — or, continued by the proxy, accumulates into the
whole reply in the SDK's own accumulator — a non-streaming call survives a 503, a
fail-fast 401 is the SDK's `AuthenticationError`, and when the proxy gives up the SDK does not retry on top of it.

The SDK runs in its own venv (sdk_venv.py), cached at $SEAKING_SDK_VENV (default ~/.cache/seaking-proxy/openai-sdk-venv).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cached_install import RegistryUnavailable
from seaking.lab.fault_upstream import REPLY_TEXT, Status, Stream
from sdk_venv import ensure_sdk_python, run_sdk_script, venv_dir

SDK_REQUIREMENT = "openai>=1"  # 0.x had another API; any newer major is what users get from pip
SDK_TIMEOUT = 10  # the SDK's own HTTP timeout: a hang shows up as APITimeoutError, not as a stuck test

# Run by the SDK venv's python: one chat completion, reported as a JSON line (the SDK's exception included).
SDK_SCRIPT = r"""
import json, sys, time
import openai

request = json.loads(sys.argv[1])
client = openai.OpenAI(
    base_url=request["base_url"], api_key="sk-client-key-123456", timeout=request["timeout"],
    max_retries=request["max_retries"],
)
result = {"version": openai.__version__, "chunks": [], "text": None, "error": None}
started = time.monotonic()
try:
    if request.get("accumulate"):  # the SDK's own accumulator: one final completion from the stream's chunks
        with client.chat.completions.stream(model="model-a", messages=[{"role": "user", "content": "Hi"}]) as stream:
            for event in stream:
                if event.type == "content.delta":
                    result["chunks"].append(event.delta)
            final = stream.get_final_completion()
        result["text"] = final.choices[0].message.content
        result["finish_reason"] = final.choices[0].finish_reason
        result["id"] = final.id
    elif request["stream"]:
        answer = client.chat.completions.create(
            model="model-a", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        for event in answer:
            if event.choices and event.choices[0].delta.content:
                result["chunks"].append(event.choices[0].delta.content)
        result["text"] = "".join(result["chunks"])
    else:
        answer = client.chat.completions.create(model="model-a", messages=[{"role": "user", "content": "Hi"}])
        result["text"] = answer.choices[0].message.content
except Exception as exc:
    result["error"] = {
        "class": type(exc).__module__ + "." + type(exc).__qualname__,
        "classes": [cls.__name__ for cls in type(exc).__mro__],
        "message": str(exc),
        "status_code": getattr(exc, "status_code", None),
        "code": getattr(exc, "code", None),
    }
result["elapsed"] = time.monotonic() - started
print(json.dumps(result))
"""


@pytest.fixture
async def sdk_python() -> Path:
    try:
        return await ensure_sdk_python(venv_dir("openai-sdk-venv", "SEAKING_SDK_VENV"), SDK_REQUIREMENT, "openai")
    except RegistryUnavailable as exc:
        pytest.skip(f"openai SDK not installable: {exc}")


async def sdk_chat(python: Path, base_url: str, stream: bool, max_retries: int = 0, accumulate: bool = False) -> dict:
    """One chat completion through the SDK in its venv: what it yielded or returned, and what it raised."""
    request = {"base_url": base_url, "stream": stream, "timeout": SDK_TIMEOUT, "max_retries": max_retries,
               "accumulate": accumulate}
    result = await run_sdk_script(python, SDK_SCRIPT, request, env_prefix="OPENAI_")
    print(f"openai {result['version']}")
    return result


async def test_a_stream_retried_after_two_503s_reaches_the_sdk_whole(proxy, upstream, sdk_python):
    chunks = ["Reliable", " streams", " through", " a", " flaky", " upstream"]
    upstream.script("chat/completions", Status(503), Status(503), Stream(chunks=chunks, delay=0.05))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=True)
    assert result["error"] is None
    assert result["chunks"] == chunks  # one SDK chunk per upstream event: relayed, not buffered into one
    assert result["text"] == "".join(chunks)
    assert len(upstream.received_at("chat/completions")) == 3


async def test_a_stream_dropped_mid_way_raises_api_error_after_the_text_that_arrived(proxy, upstream, sdk_python):
    upstream.script("chat/completions", Stream(chunks=["Half", " a", " reply", " lost"], drop_after=2))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=True)
    error = result["error"]
    assert error is not None, f"the SDK ended the broken stream without an error: {result}"
    assert "APIError" in error["classes"]
    # The SDK's own connection and timeout errors are APIErrors too: only the proxy's message and code show that the
    # SDK read the proxy's error event rather than tripping over a cut connection or waiting out its timeout.
    assert "dropped in the middle of the stream" in error["message"]
    assert error["code"] == "stream_interrupted"
    assert result["chunks"] == ["Half", " a"]
    # Well below the SDK's own timeout: the error event ended the stream, not a read timeout.
    assert result["elapsed"] < SDK_TIMEOUT / 2
    assert len(upstream.received_at("chat/completions")) == 1  # text was sent: a retry would repeat it


async def test_a_dropped_stream_continued_by_the_proxy_accumulates_into_the_whole_reply(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"target_proxy": {"prefill": "assistant"}})
    words = ["A", " reply", " that", " heals", " where", " it", " broke", " off."]
    upstream.script("chat/completions", Stream(chunks=words, drop_after=3), Stream(chunks=words))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=True, accumulate=True)
    assert result["error"] is None, result
    assert result["text"] == "".join(words) and "".join(result["chunks"]) == "".join(words)
    assert result["finish_reason"] == "stop" and result["id"] == "chatcmpl-test"
    assert len(upstream.received_at("chat/completions")) == 2


async def test_a_non_streaming_call_succeeds_after_a_503(proxy, upstream, sdk_python):
    upstream.script("chat/completions", Status(503))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=False)
    assert result["error"] is None
    assert result["text"] == REPLY_TEXT
    assert len(upstream.received_at("chat/completions")) == 2


async def test_a_fail_fast_401_raises_authentication_error(proxy, upstream, sdk_python):
    body = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}
    upstream.script("chat/completions", Status(401, body=body))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=False)
    error = result["error"]
    assert error is not None
    assert "AuthenticationError" in error["classes"]
    assert error["status_code"] == 401
    assert "Incorrect API key provided" in error["message"]
    assert len(upstream.received_at("chat/completions")) == 1


async def test_when_the_proxy_gives_up_the_sdk_does_not_retry_on_top(proxy_factory, upstream, sdk_python):
    proxy = await proxy_factory({"error_handling": {"max_retries": 2}})
    upstream.always("chat/completions", Status(503))
    result = await sdk_chat(sdk_python, proxy.url + "/v1", stream=False, max_retries=2)  # the SDK's default
    error = result["error"]
    assert error is not None and "InternalServerError" in error["classes"] and error["status_code"] == 503
    assert "gave up after 3 attempts" in error["message"]
    # x-should-retry: false. Without it the SDK would send the request twice more, each retried 3 times: 9 attempts.
    assert len(upstream.received_at("chat/completions")) == 3
