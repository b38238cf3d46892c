"""Real parts for behaviour tests: the fault-injecting upstream, mitmproxy running the addon, an aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from addon import SeakingProxy
from fault_upstream import FaultyUpstream

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)

# Fast retries so that tests take milliseconds; tests that measure waits set their own.
FAST_POLICY = {
    "target_proxy": {"timeout": 2, "retry_backoff": 2},
    "error_handling": {"base_delay": 0.01, "max_delay": 0.05, "deadline": 15},
    # Background probes would add requests that tests count; the failover tests turn them on.
    "health_check": {"interval": 0},
}


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


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
    addon: SeakingProxy
    url: str
    collector: FlowCollector
    config_path: Path
    task: asyncio.Task = field(repr=False)

    @property
    def flows(self):
        return self.collector.flows

    async def stop(self) -> None:
        self.master.shutdown()
        await asyncio.wait_for(self.task, 10)


async def start_proxy(
    tmp_path: Path, reverse_target: str, config: dict | None = None, **extra_options
) -> RunningProxy:
    config = merge(FAST_POLICY, config or {})
    config.setdefault("models", {}).setdefault("cache_file", str(tmp_path / "models-cache.json"))
    config_path = tmp_path / f"config-{id(config)}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    master = DumpMaster(
        options.Options(mode=[f"reverse:{reverse_target}"], listen_host="127.0.0.1", listen_port=0),
        with_termlog=False,
        with_dumper=False,
    )
    addon = SeakingProxy()
    collector = FlowCollector()
    master.addons.add(addon, collector)
    master.options.update(seaking_config=str(config_path), **extra_options)
    task = asyncio.create_task(master.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        addrs = master.addons.get("proxyserver").listen_addrs()
        if addrs and master.options.connection_strategy == "lazy":
            break
    else:
        raise RuntimeError("mitmproxy did not start listening")
    return RunningProxy(master, addon, f"http://127.0.0.1:{addrs[0][1]}", collector, config_path, task)


@contextlib.asynccontextmanager
async def running_upstreams():
    """start(port=0) runs a FaultyUpstream; all are stopped on exit."""
    started: list[FaultyUpstream] = []

    async def start(port: int = 0) -> FaultyUpstream:
        server = FaultyUpstream()
        await server.start(port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


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
