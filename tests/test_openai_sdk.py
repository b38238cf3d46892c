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

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fault_upstream import REPLY_TEXT, Status, Stream

SDK_REQUIREMENT = "openai>=1"  # 0.x had another API; any newer major is what users get from pip
VENV_TIMEOUT = 180  # python -m venv, with ensurepip: ~5 s
PIP_TIMEOUT = 600  # a cold install of openai and its dependencies: well under a minute
IMPORT_TIMEOUT = 60
SDK_TIMEOUT = 10  # the SDK's own HTTP timeout: a hang shows up as APITimeoutError, not as a stuck test
SCRIPT_TIMEOUT = 60  # the whole SDK subprocess: interpreter start, `import openai` (~1 s), one call

# pip's words when it cannot reach the index: those runs skip; any other pip failure is a real failure.
_PIP_NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "ConnectTimeoutError", "ReadTimeoutError", "Read timed out", "ProxyError",
    "SSLError", "Network is unreachable", "No route to host", "Connection refused", "Connection reset",
    "RemoteDisconnected", "Could not fetch URL",
)

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


class _SdkUnavailable(Exception):
    """pip could not reach the package index: the SDK tests skip rather than fail."""


_sdk_python: Path | None = None
_unavailable: _SdkUnavailable | None = None


def sdk_venv_dir() -> Path:
    default = Path.home() / ".cache" / "seaking-proxy" / "openai-sdk-venv"
    return Path(os.environ.get("SEAKING_SDK_VENV") or default)


async def run(argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Exit code and combined output of `argv`; its process group is killed if it outlives `timeout`."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env, start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:  # timed out or cancelled: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return process.returncode, output.decode(errors="replace")


async def _imports_openai(python: Path) -> bool:
    if not python.exists():
        return False
    returncode, _ = await run([str(python), "-c", "import openai"], IMPORT_TIMEOUT)
    return returncode == 0


async def ensure_sdk_python() -> Path:
    """The python of a venv where `import openai` works, creating the cached venv first if needed."""
    global _sdk_python, _unavailable
    if _sdk_python is not None:
        return _sdk_python
    if _unavailable is not None:
        raise _unavailable  # pip's retries make an offline attempt slow: try once per test run
    root = sdk_venv_dir()
    python = root / "bin" / "python"
    if await _imports_openai(python):
        _sdk_python = python
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(root.name + ".partial-*"):  # left by a killed run; a live one is younger
        if time.time() - stale.stat().st_mtime > 2 * PIP_TIMEOUT:
            shutil.rmtree(stale, ignore_errors=True)
    # Build beside the cache and rename it into place, so an interrupted build never looks like a finished one.
    # A renamed venv still works through `bin/python` (its prefix is found from pyvenv.cfg beside it); only the
    # shebangs of its console scripts keep the staging path, and nothing here uses them.
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=root.parent))
    try:
        # sys.executable is always there; venv builds on its base interpreter, not on the project's .venv.
        returncode, output = await run([sys.executable, "-m", "venv", str(staging)], VENV_TIMEOUT)
        if returncode != 0:
            raise RuntimeError(f"python -m venv failed (exit {returncode}):\n{output[-3000:]}")
        try:
            returncode, output = await run(
                [str(staging / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", "--retries", "2", SDK_REQUIREMENT],
                PIP_TIMEOUT,
            )
        except TimeoutError:
            _unavailable = _SdkUnavailable(f"pip install {SDK_REQUIREMENT} took over {PIP_TIMEOUT} s")
            raise _unavailable from None
        tail = "\n".join(output.splitlines()[-30:])
        if returncode != 0:
            if any(marker in output for marker in _PIP_NETWORK_ERRORS):
                _unavailable = _SdkUnavailable(f"pip could not reach the package index:\n{tail}")
                raise _unavailable
            raise RuntimeError(f"pip install {SDK_REQUIREMENT} failed (exit {returncode}):\n{tail}")
        if not await _imports_openai(staging / "bin" / "python"):
            raise RuntimeError(f"pip install {SDK_REQUIREMENT} finished but `import openai` fails:\n{tail}")
        if root.exists() and not await _imports_openai(python):
            shutil.rmtree(root)  # a broken cache (half-deleted, other python): replace it
        try:
            staging.rename(root)
        except OSError:
            if not await _imports_openai(python):  # else another test process built it first: use theirs
                raise
        _sdk_python = python
        return python
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture
async def sdk_python() -> Path:
    try:
        return await ensure_sdk_python()
    except _SdkUnavailable as exc:
        pytest.skip(f"openai SDK not installable: {exc}")


async def sdk_chat(python: Path, base_url: str, stream: bool) -> dict:
    """One chat completion through the SDK in its venv: what it yielded or returned, and what it raised."""
    request = {"base_url": base_url, "stream": stream, "timeout": SDK_TIMEOUT}
    # httpx honours proxy variables, which would send these loopback calls elsewhere; OPENAI_* could change the client.
    env = {k: v for k, v in os.environ.items() if not (k.lower().endswith("_proxy") or k.startswith("OPENAI_"))}
    try:
        returncode, output = await run([str(python), "-c", SDK_SCRIPT, json.dumps(request)], SCRIPT_TIMEOUT, env)
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
