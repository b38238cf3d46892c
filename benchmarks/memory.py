"""The proxy's memory beside the product description's goal (under 100 MB under normal load): its RSS idle, with 16
and with 100 streams in flight, and after thousands of streams (a third of them stalled or dropped mid-reply and
continued), on the Python running this.

    .venv/bin/python -m benchmarks.memory [--streams 3000]
    PYENV_VERSION=3.13.0 pyenv exec ...: run it with each venv's python (its mitmdump is the one beside it)

Plain mitmdump (no addon, the same upstream, streams buffered) is measured the same way as the floor. RSS is read from
/proc/PID/status (VmRSS) while the streams are open; "after" is read once they are done, and again a minute later
(seaking-proxy's AllocatorTrim gives freed memory back once a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
from pathlib import Path

import aiohttp
import yaml

from benchmarks.processes import run, status_kib
from seaking.lab.fault_upstream import FaultyUpstream, Stream, split_words
from seaking.lab.harness import Mitmdump
from seaking.memory import TRIM_INTERVAL

WORDS = split_words(" ".join(f"w{i}" for i in range(60)))
CONFIG = {"target_proxy": {"prefill": "assistant"}, "streaming": {"idle_timeout": 1}, "health_check": {"interval": 0}}


def rss_mib(pid: int) -> float:
    return round(status_kib(pid, "VmRSS") / 1024, 1)


async def streams(url: str, count: int, at_once: int) -> None:
    """`count` streaming chats, `at_once` at a time, each read to its end."""
    limit = asyncio.Semaphore(at_once)
    body = {"model": "model-a", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}

    async def one(session: aiohttp.ClientSession) -> None:
        async with limit, session.post(url + "/v1/chat/completions", json=body) as response:
            await response.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))


async def in_flight(url: str, pid: int, count: int) -> float:
    """RSS with `count` streams open at once (each of 60 words, 50 ms apart: 3 s), read in the middle of them."""
    running = asyncio.create_task(streams(url, count, count))
    await asyncio.sleep(1.5)
    rss = rss_mib(pid)
    await running
    return rss


async def measure(way: str, upstream: FaultyUpstream, workdir: Path, total: int) -> dict:
    upstream.always("chat/completions", Stream(chunks=WORDS, delay=0.05))
    if way == "seaking-proxy":
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump({**CONFIG, "models": {"cache_file": str(workdir / "models.json")}}))
        proxy = Mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}", "--set", "flow_detail=0")
    else:
        proxy = Mitmdump("--mode", f"reverse:{upstream.url}", "--set", "flow_detail=0", addon=False)
    url = await proxy.start()
    pid = proxy.process.pid
    try:
        await streams(url, 4, 4)  # warm
        found = {"idle": rss_mib(pid)}
        found["16 streams"] = await in_flight(url, pid, 16)
        found["100 streams"] = await in_flight(url, pid, 100)
        upstream.always("chat/completions", Stream(chunks=WORDS, delay=0.01))
        if way == "seaking-proxy":  # plain mitmdump would wait for ever on a stall
            rng = random.Random(3)
            for _ in range(total // 3):
                fault = rng.choice([{"stall_after": rng.randint(5, 50)}, {"drop_after": rng.randint(5, 50)}])
                upstream.script("chat/completions", Stream(chunks=WORDS, delay=0.01, **fault), Stream(chunks=WORDS, delay=0.01))
        await streams(url, total, 100)
        found[f"after {total} streams"] = rss_mib(pid)
        await asyncio.sleep(TRIM_INTERVAL + 5)  # seaking-proxy's AllocatorTrim has run since
        found[f"after {total} streams, a minute later"] = rss_mib(pid)
    finally:
        await proxy.stop()
    return found


async def main_async(total: int) -> dict:
    upstream = FaultyUpstream()
    await upstream.start()
    try:
        with tempfile.TemporaryDirectory(prefix="seaking-memory-") as workdir:
            return {
                "python": platform.python_version(),
                "plain mitmdump": await measure("mitmdump", upstream, Path(workdir), total),
                "seaking-proxy": await measure("seaking-proxy", upstream, Path(workdir), total),
            }
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=3000)
    print(json.dumps(run(main_async(parser.parse_args().streams)), indent=1))


if __name__ == "__main__":
    main()
