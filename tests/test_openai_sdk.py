"""The official `openai` Python SDK, pointed at the proxy, sees what its users should see.

The other tests read the proxy's bytes with aiohttp; these prove that the most common real client understands them:
a stream retried after 503s arrives whole, a stream that breaks mid-way ends in an `openai.APIError` carrying the
proxy's message after the text that did arrive (and without hanging), a non-streaming call survives a 503, and a
fail-fast 401 is the SDK's `AuthenticationError`.

Why a separate venv: current `openai` releases need h11 >= 0.16 (through httpx/httpcore) while mitmproxy 11 pins
h11 <= 0.14, so the two cannot share the project's .venv. The SDK gets its own venv, built once and cached at
$SEAKING_SDK_VENV (default ~/.cache/seaking-proxy/openai-sdk-venv), and runs in a subprocess of that venv's python
while the proxy and the fault upstream serve in this test's event loop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cached_install import RegistryUnavailable, check, install_once, run
from fault_upstream import REPLY_TEXT, Status, Stream

SDK_REQUIREMENT = "openai>=1"  # 0.x had another API; any newer major is what users get from pip
VENV_TIMEOUT = 180  # python -m venv, with ensurepip: ~5 s
PIP_TIMEOUT = 600  # a cold install of openai and its dependencies: well under a minute
IMPORT_TIMEOUT = 60
SDK_TIMEOUT = 10  # the SDK's own HTTP timeout: a hang shows up as APITimeoutError, not as a stuck test
SCRIPT_TIMEOUT = 60  # the whole SDK subprocess: interpreter start, `import openai` (~1 s), one call

# Run by the SDK venv's python: one chat completion, reported as a JSON line (the SDK's exception included).
SDK_SCRIPT = r"""
import json, sys, time
import openai

request = json.loads(sys.argv[1])
client = openai.OpenAI(
    base_url=request["base_url"], api_key="sk-client-key-123456", timeout=request["timeout"], max_retries=0
)
result = {"version": openai.__version__, "chunks": [], "text": None, "error": None}
started = time.monotonic()
try:
    answer = client.chat.completions.create(
        model="model-a", messages=[{"role": "user", "content": "Hi"}], stream=request["stream"]
    )
    if request["stream"]:
        for event in answer:
            if event.choices and event.choices[0].delta.content:
                result["chunks"].append(event.choices[0].delta.content)
        result["text"] = "".join(result["chunks"])
    else:
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


_sdk_python: Path | None = None


def sdk_venv_dir() -> Path:
    default = Path.home() / ".cache" / "seaking-proxy" / "openai-sdk-venv"
    return Path(os.environ.get("SEAKING_SDK_VENV") or default)


async def _imports_openai(python: Path) -> bool:
    if not python.exists():
        return False
    returncode, _ = await run([str(python), "-c", "import openai"], IMPORT_TIMEOUT)
    return returncode == 0


async def ensure_sdk_python() -> Path:
    """The python of a venv where `import openai` works, creating the cached venv first if needed."""
    global _sdk_python
    if _sdk_python is None:

        async def install(staging: Path) -> None:
            # sys.executable is always there; venv builds on its base interpreter, not on the project's .venv.
            check("python -m venv", *await run([sys.executable, "-m", "venv", str(staging)], VENV_TIMEOUT))
            pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
            check(f"pip install {SDK_REQUIREMENT}", *await run([*pip, "--retries", "2", SDK_REQUIREMENT], PIP_TIMEOUT))

        # A renamed venv still works through `bin/python` (its prefix is found from pyvenv.cfg beside it); only the
        # shebangs of its console scripts keep the staging path, and nothing here uses them.
        root = await install_once(sdk_venv_dir(), lambda root: _imports_openai(root / "bin" / "python"), install, PIP_TIMEOUT)
        _sdk_python = root / "bin" / "python"
    return _sdk_python


@pytest.fixture
async def sdk_python() -> Path:
    try:
        return await ensure_sdk_python()
    except RegistryUnavailable as exc:
        pytest.skip(f"openai SDK not installable: {exc}")


async def sdk_chat(python: Path, base_url: str, stream: bool) -> dict:
    """One chat completion through the SDK in its venv: what it yielded or returned, and what it raised."""
    request = {"base_url": base_url, "stream": stream, "timeout": SDK_TIMEOUT}
    # httpx honours proxy variables, which would send these loopback calls elsewhere; OPENAI_* could change the client.
    env = {k: v for k, v in os.environ.items() if not (k.lower().endswith("_proxy") or k.startswith("OPENAI_"))}
    try:
        returncode, output = await run([str(python), "-c", SDK_SCRIPT, json.dumps(request)], SCRIPT_TIMEOUT, env=env)
    except TimeoutError:
        pytest.fail(f"the SDK did not finish within {SCRIPT_TIMEOUT} s (it hangs)")
    assert returncode == 0, f"the SDK script crashed:\n{output}"
    result = json.loads(output.strip().splitlines()[-1])
    print(f"openai {result['version']}: {json.dumps(result)}")  # shown with -s or on failure
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
