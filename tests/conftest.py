"""Real parts for behaviour tests: the fault-injecting upstream, mitmproxy running the addon, an aiohttp client.
The upstream and mitmdump as a subprocess come from the lab's harness (seaking/lab/harness.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, settings
from multidict import CIMultiDict
from mitmproxy import options
from mitmproxy.addons.view import View
from mitmproxy.tools.dump import DumpMaster

import addon
from seaking.lab.harness import Mitmdump, running_upstreams

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)

# Property tests (tests/test_properties_*.py). "ci": the same examples on every run (derandomized, no example database),
# so that a red CI is reproducible and a green one stays green until the code changes; .ci/run sets CI. "dev": more
# examples, new ones each run, so that local runs keep exploring. HYPOTHESIS_PROFILE=<name> chooses either. No
# per-example deadline in either: the machines are shared, and these tests are about answers, not speed.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


# Fast retries so that tests take milliseconds; tests that measure waits set their own.
FAST_POLICY = {
    "target_proxy": {"timeout": 2, "retry_backoff": 2},
    "error_handling": {"base_delay": 0.01, "max_delay": 0.05, "deadline": 15},
    # Background probes would add requests that tests count; the failover tests turn them on.
    "health_check": {"interval": 0},
    # A test that stops its proxy with requests still in flight need not wait the default 30 s for them.
    "server": {"shutdown_grace": 1},
}


# Tests that start processes (mitmdump, the SDKs' venvs, SillyTavern, HAProxy) are slow; so are those marked by hand
# for running seconds by design. `pytest -m "not slow"` runs the pure and in-process rest.
PROCESS_FIXTURES = {"mitmdump", "sdk_python", "sillytavern", "haproxy"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def is_attempt(flow) -> bool:
    return "attempt_of" in flow.metadata.get("seaking", {})


class FlowCollector:
    """Keeps every finished flow, as mitmweb would show it."""

    def __init__(self) -> None:
        self.flows = []

    def response(self, flow) -> None:
        self.flows.append(flow)

    def error(self, flow) -> None:
        self.flows.append(flow)


@dataclass
class RunningProxy:
    master: DumpMaster
    addons: list
    url: str
    collector: FlowCollector
    config_path: Path
    task: asyncio.Task = field(repr=False)

    @property
    def flows(self):
        """The client flows, as mitmweb lists them (without the attempt flows)."""
        return [f for f in self.collector.flows if not is_attempt(f)]

    @property
    def attempt_flows(self):
        return [f for f in self.collector.flows if is_attempt(f)]

    def addon(self, name: str):
        """One of the pipeline's addons, by its mitmproxy name without the "seaking." prefix."""
        return self.master.addons.get(f"seaking.{name}")

    @property
    def shared(self):
        return self.addon("settings").shared

    async def stop(self) -> None:
        self.master.shutdown()
        await asyncio.wait_for(self.task, 10)


async def start_proxy(
    tmp_path: Path, reverse_target: str, config: dict | None = None, flow_list: bool = True, **extra_options
) -> RunningProxy:
    """mitmproxy with the pipeline, in this event loop. flow_list: with mitmproxy's View addon, as in mitmweb."""
    config = merge(FAST_POLICY, config or {})
    config.setdefault("models", {}).setdefault("cache_file", str(tmp_path / "models-cache.json"))
    config_path = tmp_path / f"config-{id(config)}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    master = DumpMaster(
        options.Options(mode=[f"reverse:{reverse_target}"], listen_host="127.0.0.1", listen_port=0),
        with_termlog=False,
        with_dumper=False,
    )
    pipeline = addon.pipeline()
    collector = FlowCollector()
    if flow_list:
        master.addons.add(View())
    master.addons.add(*pipeline, collector)
    # As with `mitmdump -s addon.py`, whose script addons run before mitmproxy's recorder: it writes a flow (-w) once
    # the pipeline is done with it.
    save = master.addons.get("save")
    master.addons.chain.remove(save)
    master.addons.chain.append(save)
    master.options.update(seaking_config=str(config_path), **extra_options)
    task = asyncio.create_task(master.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        addrs = master.addons.get("proxyserver").listen_addrs()
        if addrs and master.options.connection_strategy == "lazy":
            break
    else:
        raise RuntimeError("mitmproxy did not start listening")
    return RunningProxy(master, pipeline, f"http://127.0.0.1:{addrs[0][1]}", collector, config_path, task)


@pytest.fixture
async def mitmdump(tmp_path):
    """make(*args, env=..., cwd=..., port=..., program=..., addon=...) -> a Mitmdump (not started), its models cache
    in this test's directory; all are stopped at the end."""
    started: list[Mitmdump] = []

    def make(*args: str, env: dict | None = None, **kwargs) -> Mitmdump:
        process = Mitmdump(*args, env={"XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})}, **kwargs)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.process is not None:
            await process.stop()


@contextlib.asynccontextmanager
async def running_proxies(tmp_path: Path, default_target: str):
    """start(config=..., target=...) runs mitmproxy with the addon in this event loop; all are stopped on exit."""
    started: list[RunningProxy] = []

    async def start(config: dict | None = None, target: str | None = None, **extra_options) -> RunningProxy:
        running = await start_proxy(tmp_path, target or default_target, config, **extra_options)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            await running.stop()


@pytest.fixture
async def upstream_factory():
    """More upstreams (failover targets)."""
    async with running_upstreams() as start:
        yield start


@pytest.fixture
async def upstream(upstream_factory):
    return await upstream_factory()


@pytest.fixture
async def proxy_factory(tmp_path, upstream):
    async with running_proxies(tmp_path, upstream.url) as start:
        yield start


@pytest.fixture
async def proxy(proxy_factory):
    return await proxy_factory()


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


@dataclass
class Answer:
    status: int
    reason: str
    headers: CIMultiDict
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        return self.json()["error"]


async def call(client: aiohttp.ClientSession, method: str, url: str, **kwargs) -> Answer:
    async with client.request(method, url, **kwargs) as response:
        return Answer(response.status, response.reason, CIMultiDict(response.headers), await response.read())


CHAT = {"model": "model-a", "messages": [{"role": "user", "content": "Hi"}], "stream": False}


async def chat(client, proxy: RunningProxy, body: dict | None = None, path="/v1/chat/completions", **kwargs) -> Answer:
    headers = {"Authorization": "Bearer sk-client-key-123456", **kwargs.pop("headers", {})}
    return await call(client, "POST", proxy.url + path, json=body or CHAT, headers=headers, **kwargs)
