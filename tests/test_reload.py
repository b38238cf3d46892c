"""Config reload without a restart: an edited file takes effect within about a second, requests in flight keep the
config they started with, breakers of targets still configured keep their state, a bad file changes nothing and is
logged once per version; the seaking.reload command; the seaking_config option (mitmweb's Options editor)."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from mitmproxy import exceptions

from conftest import CHAT, FAST_POLICY, call, chat, merge
from seaking.lab.fault_upstream import Reset, Status

KEY_BEFORE = "sk-upstream-before-0001"
KEY_AFTER = "sk-upstream-after-00002"


def rewrite(path: Path, config: dict | str) -> None:
    """Replace the file as editors do (write, then rename), so the proxy never reads half a file."""
    cache = {"models": {"cache_file": str(path.parent / "models-cache.json")}}
    text = config if isinstance(config, str) else yaml.safe_dump(merge(merge(FAST_POLICY, cache), config))
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def until(condition, timeout: float = 5) -> float:
    """Seconds until `condition()` (a value or an awaitable) is true."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await _value(condition()):
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _value(result):
    return await result if inspect.isawaitable(result) else result


def authorization(received) -> str:
    return received.headers["Authorization"]


async def test_an_edited_file_takes_effect_within_about_a_second(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": KEY_BEFORE}})
    assert (await chat(client, proxy)).status == 200
    assert authorization(upstream.received[-1]) == f"Bearer {KEY_BEFORE}"

    rewrite(proxy.config_path, {"target_proxy": {"api_key": KEY_AFTER}})

    async def new_key_used() -> bool:
        await chat(client, proxy)
        return authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"

    assert await until(new_key_used) < 3  # checked twice a second; generous for a busy machine


@pytest.mark.slow
async def test_a_request_in_flight_keeps_the_config_it_started_with(proxy_factory, upstream, client):
    proxy = await proxy_factory(
        {"target_proxy": {"api_key": KEY_BEFORE}, "error_handling": {"max_retries": 3, "base_delay": 0.6, "max_delay": 0.6}}
    )
    # Retry-After makes each wait exactly 1 s (a jittered back-off may be a few ms): the reload lands mid-request.
    upstream.script("chat/completions", *[Status(503, headers={"Retry-After": "1"})] * 2)  # then a good answer
    in_flight = asyncio.create_task(chat(client, proxy))
    await until(lambda: len(upstream.received) >= 1)
    rewrite(proxy.config_path, {"target_proxy": {"api_key": KEY_AFTER}, "error_handling": {"max_retries": 0}})
    await until(lambda: proxy.shared.snapshot.config.target_proxy.api_key == KEY_AFTER)

    answer = await in_flight
    assert answer.status == 200 and answer.headers["x-seaking-attempts"] == "3"  # its 3 retries, not the new 0
    assert [authorization(r) for r in upstream.received] == [f"Bearer {KEY_BEFORE}"] * 3  # and its key throughout

    upstream.script("chat/completions", Status(503))
    after = await chat(client, proxy)  # a new request runs on the new config
    assert (after.status, after.error["attempts"]) == (503, 1)
    assert authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"


async def test_breakers_of_targets_still_configured_keep_their_state(proxy_factory, upstream, upstream_factory, client):
    backup, dropped, added = await upstream_factory(), await upstream_factory(), await upstream_factory()
    targets = [{"url": backup.url}, {"url": dropped.url}]
    proxy = await proxy_factory({"targets": targets, "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60}})
    upstream.always("chat/completions", Reset())
    assert (await chat(client, proxy)).status == 200  # the primary failed once: its breaker is open
    before = (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"]
    assert [t["state"] for t in before] == ["open", "closed", "unknown"]

    rewrite(proxy.config_path, {"targets": [{"url": backup.url}, {"url": added.url}], "circuit_breaker": {"failure_threshold": 1, "open_seconds": 60}})

    async def reloaded() -> bool:
        status = (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"]
        return [t["url"] for t in status] == [upstream.url, backup.url, added.url]

    await until(reloaded)
    after = (await call(client, "GET", proxy.url + "/_seaking/status")).json()["targets"]
    assert [t["state"] for t in after] == ["open", "closed", "unknown"]  # the primary is still skipped ...
    assert (after[0]["failures"], after[1]["requests"]) == (before[0]["failures"], before[1]["requests"])  # ... and counted
    received = len(upstream.received)
    assert (await chat(client, proxy)).headers["x-seaking-target"] == f"127.0.0.1:{backup.port}"
    assert len(upstream.received) == received  # the open primary was not tried


@pytest.mark.slow
async def test_a_bad_file_changes_nothing_and_its_error_is_logged_once_per_version(mitmdump, upstream, client, tmp_path):
    config = tmp_path / "config.yaml"
    rewrite(config, {"target_proxy": {"api_key": KEY_BEFORE}})
    proxy = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    url = await proxy.start()

    rewrite(config, {"target_proxy": {"api_key": KEY_AFTER}, "error_handling": {"base_delay": -1}})
    await asyncio.sleep(2)  # four checks of the file
    rewrite(config, "target_proxy:\n  timeout: [\n")
    await asyncio.sleep(2)
    answer = await call(client, "POST", url + "/v1/chat/completions", json=CHAT)
    assert answer.status == 200 and authorization(upstream.received[-1]) == f"Bearer {KEY_BEFORE}"  # the old config runs

    rewrite(config, {"target_proxy": {"api_key": KEY_AFTER}})
    await asyncio.sleep(1.5)
    await call(client, "POST", url + "/v1/chat/completions", json=CHAT)
    assert authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"
    await proxy.stop()
    assert proxy.output.count("error_handling.base_delay: must be at least 0, got -1") == 1
    assert proxy.output.count("is not valid YAML") == 1
    assert proxy.output.count("still running on the config loaded before") == 2
    assert f"seaking-proxy config {config} loaded: 1 target(s), 1 kept with their state" in proxy.output, proxy.output
    for key in (KEY_BEFORE, KEY_AFTER):
        assert key not in proxy.output


async def test_the_reload_command(proxy_factory, upstream, client):
    proxy = await proxy_factory({"target_proxy": {"api_key": KEY_BEFORE}})
    proxy.master.addons.get("seaking.settings")._watcher.cancel()  # only the command reloads here
    rewrite(proxy.config_path, {"target_proxy": {"api_key": KEY_AFTER}})
    assert "loaded: 1 target(s), 1 kept" in proxy.master.commands.call("seaking.reload")
    await chat(client, proxy)
    assert authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"

    rewrite(proxy.config_path, {"load_balancing": "fastest"})
    with pytest.raises(exceptions.CommandError, match="load_balancing: must be one of priority, round_robin, weighted"):
        proxy.master.commands.call("seaking.reload")
    assert proxy.shared.snapshot.config.target_proxy.api_key == KEY_AFTER


async def test_the_seaking_config_option_switches_files_and_a_bad_one_is_rolled_back(proxy_factory, upstream, client, tmp_path):
    proxy = await proxy_factory({"target_proxy": {"api_key": KEY_BEFORE}})
    other = tmp_path / "other.yaml"
    rewrite(other, {"target_proxy": {"api_key": KEY_AFTER}})
    proxy.master.options.update(seaking_config=str(other))
    await chat(client, proxy)
    assert authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"

    for bad in (tmp_path / "missing.yaml", tmp_path / "bad.yaml"):
        rewrite(tmp_path / "bad.yaml", {"error_handling": {"retry_codes": [401]}})
        with pytest.raises(exceptions.OptionsError, match=f"seaking-proxy config {bad}"):
            proxy.master.options.update(seaking_config=str(bad))
        assert proxy.master.options.seaking_config == str(other)  # rolled back
        await chat(client, proxy)
        assert authorization(upstream.received[-1]) == f"Bearer {KEY_AFTER}"


async def test_mitmwebs_options_editor_rolls_back_a_bad_file(mitmdump, upstream, client, tmp_path, unused_tcp_port):
    config, bad = tmp_path / "config.yaml", tmp_path / "bad.yaml"
    rewrite(config, {})
    rewrite(bad, {"error_handling": {"max_retry": 3}})
    web = mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}",
                   "--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(unused_tcp_port),
                   "--set", "web_password=sesame")
    web.args[0] = str(Path(web.args[0]).with_name("mitmweb"))
    await web.start()
    await until(lambda: f"127.0.0.1:{unused_tcp_port}" in web.output, timeout=30)  # its web server too
    api = f"http://127.0.0.1:{unused_tcp_port}"
    xsrf = {"Cookie": "_xsrf=x; _mitmproxy_xsrf=x", "X-XSRFToken": "x", "Authorization": "Bearer sesame"}
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{api}/options?token=sesame", json={"seaking_config": str(bad)}, headers=xsrf) as put:
            refused = (put.status, await put.text())
        async with session.get(f"{api}/options?token=sesame", headers=xsrf) as get:
            shown = (await get.json())["seaking_config"]["value"]
    assert refused[0] == 400 and "error_handling.max_retry: unknown key" in refused[1]
    assert shown == str(config)
