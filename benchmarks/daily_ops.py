"""How quickly do the running-every-day operations act? Measures, asserts nothing.

    .venv/bin/python -m benchmarks.daily_ops [--edits 20]

  reload ...... `mitmdump -s addon.py` runs; the config file is rewritten (write, then rename) with a new upstream key
                `--edits` times; after each, requests go out every 20 ms until the upstream sees the new key.
                Reported: seconds from the rename to the first request carrying the new key (median, max).
  shutdown .... the same proxy gets SIGTERM with nothing in flight, then with one stream in flight under a 2 s grace
                period. Reported: seconds from the signal to the process's exit.
Everything runs on 127.0.0.1: the lab's fault upstream in this process, mitmdump as a subprocess (the lab's harness).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from benchmarks.processes import run
from seaking.lab.fault_upstream import FaultyUpstream, Stream
from seaking.lab.harness import Mitmdump

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def write_config(path: Path, key: str, grace: float = 2) -> None:
    temporary = path.with_suffix(".tmp")
    config = {"target_proxy": {"api_key": key}, "server": {"shutdown_grace": grace}, "health_check": {"interval": 0},
              "models": {"cache_file": str(path.parent / "models.json")}}
    temporary.write_text(yaml.safe_dump(config))
    os.replace(temporary, path)


async def start_proxy(upstream: FaultyUpstream, config: Path) -> tuple[Mitmdump, str]:
    proxy = Mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    return proxy, await proxy.start()


async def measure_reloads(session, upstream, config: Path, url: str, edits: int) -> list[float]:
    delays = []
    for number in range(edits):
        key = f"sk-edit-{number:04d}-abcdef"
        write_config(config, key)
        written = time.monotonic()
        async with asyncio.timeout(10):
            while True:
                async with session.post(url + "/v1/chat/completions", json=CHAT) as response:
                    await response.read()
                if upstream.received[-1].headers.get("Authorization") == f"Bearer {key}":
                    break
                await asyncio.sleep(0.02)
        delays.append(time.monotonic() - written)
        await asyncio.sleep(0.3)  # edits at different points of the watcher's cycle
    return delays


async def measure_exit(proxy: Mitmdump) -> float:
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        await proxy.process.wait()
    elapsed = time.monotonic() - signalled
    await proxy.stop()  # the rest of its output
    return elapsed


async def main(edits: int) -> None:
    upstream = FaultyUpstream()
    await upstream.start()
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.yaml"
        write_config(config, "sk-first-key-000000")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            proxy, url = await start_proxy(upstream, config)
            delays = await measure_reloads(session, upstream, config, url, edits)
            idle_exit = await measure_exit(proxy)

            proxy, url = await start_proxy(upstream, config)
            upstream.script("chat/completions", Stream(chunks=[f"w{i} " for i in range(100)], delay=0.1))
            stream = asyncio.create_task(session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}))
            await asyncio.sleep(0.5)
            busy_exit = await measure_exit(proxy)
            response = await stream
            body = await response.read()
    await upstream.stop()
    ended_cleanly = b'"proxy_shutdown"' in body and body.endswith(b"data: [DONE]\n\n")
    print(f"reload: {edits} edits, seconds from the rename to the new key in use: "
          f"median {statistics.median(delays):.2f}, max {max(delays):.2f}")
    print(f"shutdown, nothing in flight: exit {idle_exit:.2f} s after SIGTERM")
    print(f"shutdown, one 10 s stream in flight, grace 2 s: exit {busy_exit:.2f} s after SIGTERM; "
          f"the stream ended with the proxy_shutdown event and [DONE]: {ended_cleanly}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    run(main(parser.parse_args().edits))
