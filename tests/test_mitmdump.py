"""The command users run: `mitmdump -s addon.py --mode reverse:<target>`, as a real subprocess."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from mitmproxy import io

from conftest import call, is_attempt
from seaking.lab.fault_upstream import Reset, Status
from seaking.lab.harness import free_port

UPSTREAM_KEY = "sk-upstream-secret-in-subprocess"


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
        [flow] = [f for f in io.FlowReader(fh).stream() if not is_attempt(f)]
    assert flow.marked == ":repeat:" and flow.comment.startswith("2 attempts: 503, 401")


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


async def test_without_an_upstream_start_up_stops_and_says_how_to_give_one(mitmdump, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("targets: []\n")
    proxy = mitmdump("--set", f"seaking_config={config}")  # mitmproxy's regular mode: no reverse target
    assert await proxy.run_to_exit() != 0
    assert "seaking-proxy needs an upstream: run mitmproxy with --mode reverse:<url>, or set target_proxy.url" in proxy.output


async def test_a_proxy_environment_variable_it_cannot_use_stops_start_up(mitmdump, upstream, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("targets: []\n")
    proxy = mitmdump("--mode", "reverse:https://api.example", "--set", f"seaking_config={config}",
                     env={"HTTPS_PROXY": "socks4://p:1080"})
    assert await proxy.run_to_exit() != 0
    assert "https_proxy (HTTPS_PROXY): must be a http://" in proxy.output


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


async def test_the_first_connection_is_answered_by_the_addon(mitmdump, tmp_path):
    """Connect the moment the port opens: mitmproxy 12 may listen before a script's `running` hook, and with its
    default eager connection strategy an unreachable upstream then closes the client with no answer at all."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"error_handling": {"max_retries": 0}}))
    for _ in range(3):
        port = free_port()
        proxy = mitmdump("--mode", "reverse:http://127.0.0.1:9", "--set", f"seaking_config={config}", port=port)
        await proxy.spawn()
        async with asyncio.timeout(30):
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    await asyncio.sleep(0.002)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the end: Connection: close
        writer.close()
        assert answer.startswith(b"HTTP/1.1 502 ") and b'"upstream_unreachable"' in answer, answer
        await proxy.stop()


async def test_another_script_with_its_own_config_module_loads_beside_it(mitmdump, upstream, client, tmp_path):
    """mitmproxy puts each script's folder on one shared sys.path: a generic module name of ours would shadow theirs,
    or theirs ours. Both orders, from an unrelated working directory."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.py").write_text('MARKER = "the other script\'s config"\n')
    (other / "other.py").write_text(
        "import config\n\n\n"
        "class Other:\n"
        "    def response(self, flow):\n"
        "        flow.response.headers['x-other'] = config.MARKER\n\n\n"
        "addons = [Other()]\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "config.py").write_text("raise RuntimeError('a config.py in the working directory was imported')\n")
    for order in ("other first", "seaking first"):
        proxy = mitmdump("--mode", f"reverse:{upstream.url}", cwd=elsewhere)
        other_script = ["-s", str(other / "other.py")]
        proxy.args[1:1] = other_script if order == "other first" else []
        proxy.args += [] if order == "other first" else other_script
        url = await proxy.start()
        answer = await call(client, "POST", url + "/v1/chat/completions", json={"model": "m", "messages": []})
        assert (answer.status, answer.headers.get("x-other"), answer.headers.get("x-seaking-attempts")) == (
            200, "the other script's config", "1"), (order, proxy.output)
        assert "Traceback" not in proxy.output, proxy.output
        await proxy.stop()
