"""The command users run: `mitmdump -s addon.py --mode reverse:<target>`, as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from mitmproxy import io

from conftest import call
from fault_upstream import Reset, Status

ROOT = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).with_name("mitmdump")
UPSTREAM_KEY = "sk-upstream-secret-in-subprocess"


class Mitmdump:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.args = [str(MITMDUMP), "-s", str(ROOT / "addon.py"), "--listen-host", "127.0.0.1", "--listen-port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self.output = ""

    async def start(self) -> str:
        """Start and return the proxy URL; raise with the output if it exits instead."""
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env
        )
        async with asyncio.timeout(30):
            while line := await self.process.stdout.readline():
                self.output += line.decode()
                if match := re.search(r"listening at .*:(\d+)", self.output):
                    return f"http://127.0.0.1:{match.group(1)}"
        await self.process.wait()
        raise RuntimeError(f"mitmdump exited with {self.process.returncode}:\n{self.output}")

    async def run_to_exit(self) -> int:
        """For start-ups that must fail: mitmproxy logs the error, may open its listener, then exits."""
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env
        )
        async with asyncio.timeout(30):
            output, _ = await self.process.communicate()
        self.output = output.decode()
        return self.process.returncode

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(10):
                    rest, _ = await self.process.communicate()
                    self.output += rest.decode()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode


@pytest.fixture
async def mitmdump(tmp_path):
    started: list[Mitmdump] = []

    def make(*args: str, env: dict | None = None) -> Mitmdump:
        process = Mitmdump(*args, env={"XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})})
        started.append(process)
        return process

    yield make
    for process in started:
        if process.process is not None:
            await process.stop()


async def test_the_plain_command_works_with_the_shipped_config(mitmdump, upstream, client, tmp_path):
    upstream.script("chat/completions", Status(503), Reset())
    proxy = mitmdump("--mode", f"reverse:{upstream.url}")
    url = await proxy.start()
    answer = await call(client, "POST", url + "/v1/chat/completions", json={"model": "m", "messages": []})
    assert answer.status == 200
    models = await call(client, "GET", url + "/v1/models")
    assert models.status == 200
    assert (tmp_path / "cache" / "seaking-proxy" / "models.json").exists()
    assert await proxy.stop() == 0


async def test_recorded_flows_never_hold_the_key(mitmdump, upstream, client, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"target_proxy": {"api_key": UPSTREAM_KEY}, "error_handling": {"base_delay": 0.01}}))
    recording = tmp_path / "flows.mitm"
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}", "-w", str(recording),
                     "--set", "flow_detail=4")
    url = await proxy.start()
    upstream.script("chat/completions", Status(503), Status(401, body={"error": {"message": f"bad key {UPSTREAM_KEY}"}}))
    answer = await call(client, "POST", url + "/v1/chat/completions", json={"model": "m", "messages": []},
                        headers={"Authorization": "Bearer sk-client-side-key-0001"})
    assert answer.status == 401
    assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    await proxy.stop()
    for secret in (UPSTREAM_KEY, "sk-client-side-key-0001"):
        assert secret not in proxy.output  # flow_detail=4 prints every header and body
        assert secret.encode() not in recording.read_bytes()
        assert secret not in answer.body.decode()
    with recording.open("rb") as fh:
        [flow] = list(io.FlowReader(fh).stream())
    assert flow.marked == ":repeat:" and flow.comment.startswith("2 attempts: 503 → 401")


@pytest.mark.parametrize(
    ("config_text", "words"),
    [
        ("error_handling:\n  max_retry: 3\n", "error_handling.max_retry: unknown key"),
        ("error_handling:\n  base_delay: -1\n", "error_handling.base_delay: must be at least 0"),
        ("error_handling:\n  retry_codes: [401]\n", "cannot be both retried and failed fast"),
        ("target_proxy: [\n", "not valid YAML"),
    ],
)
async def test_config_errors_stop_start_up_naming_the_key(mitmdump, upstream, tmp_path, config_text, words):
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    assert await proxy.run_to_exit() != 0
    assert words in proxy.output
    assert "Error logged during startup, exiting" in proxy.output


async def test_a_missing_config_file_stops_start_up(mitmdump, upstream, tmp_path):
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={tmp_path / 'nope.yaml'}")
    assert await proxy.run_to_exit() != 0
    assert "seaking_config: cannot read" in proxy.output


async def test_an_unreachable_target_still_gets_answers(mitmdump, client, tmp_path):
    # mitmproxy's default eager connection strategy would close the client connection with no answer at all.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"error_handling": {"max_retries": 0}, "models": {"fallback": ["local-model"]}}))
    proxy = mitmdump("--mode", "reverse:http://127.0.0.1:9", "--set", f"seaking_config={config}")
    url = await proxy.start()
    models = await call(client, "GET", url + "/v1/models")
    assert (models.status, models.json()["data"][0]["id"]) == (200, "local-model")
    chat = await call(client, "POST", url + "/v1/chat/completions", json={"model": "m", "messages": []})
    assert (chat.status, chat.error["code"]) == (502, "upstream_unreachable")
