"""More than one core: two `mitmdump -s addon.py` processes behind HAProxy on one port, set up as docs/haproxy.cfg
says (docs/running.md). Both serve; the /models cache file is theirs to share; breakers are their own."""

from __future__ import annotations

import asyncio
import re

import pytest
import yaml
from conftest import call
from seaking.lab.fault_upstream import MODEL_IDS, Status
from seaking.lab.haproxy import haproxy_binary, haproxy_config
from seaking.lab.harness import free_port
from test_streaming import read_stream

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="HAProxy is not installed (Debian: haproxy)")


class Url:
    def __init__(self, url: str) -> None:
        self.url = url


@pytest.fixture
async def haproxy(tmp_path):
    """start(ports) runs HAProxy with docs/haproxy.cfg in front of those ports; its URL. Stopped at the end."""
    started = []

    async def start(ports: list[int]) -> str:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(port, ports))
        process = await asyncio.create_subprocess_exec(
            haproxy_binary(), "-db", "-f", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        started.append(process)
        async with asyncio.timeout(15):
            while True:
                if process.returncode is not None:
                    raise RuntimeError((await process.stdout.read()).decode())
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    return f"http://127.0.0.1:{port}"
                except OSError:
                    await asyncio.sleep(0.05)

    yield start
    for process in started:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def test_two_processes_behind_haproxy_share_the_load_and_the_models_cache(
    mitmdump, haproxy, upstream, client, tmp_path
):
    config = tmp_path / "config.yaml"
    cache = tmp_path / "shared" / "models.json"
    config.write_text(yaml.safe_dump({
        "models": {"cache_file": str(cache)},
        "health_check": {"interval": 0},
        "error_handling": {"base_delay": 0.01, "max_delay": 0.05},
    }))
    processes = [mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}") for _ in range(2)]
    urls = [await p.start() for p in processes]
    front = await haproxy([int(url.rsplit(":", 1)[1]) for url in urls])

    answers = [await call(client, "POST", front + "/v1/chat/completions", json={"model": "m", "messages": []})
               for _ in range(12)]
    assert [a.status for a in answers] == [200] * 12
    assert all(a.headers["x-seaking-attempts"] == "1" for a in answers)  # seaking-proxy answered, not HAProxy
    read = await read_stream(client, Url(front))
    assert read.status == 200 and read.ended_cleanly and read.data[-1] == b"[DONE]"

    # One process fetches the model list; when the upstream is down, the other answers from the file they share.
    first = await call(client, "GET", urls[0] + "/v1/models")
    assert first.status == 200 and cache.exists()
    upstream.always("models", Status(503))
    from_other = await call(client, "GET", urls[1] + "/v1/models")
    assert from_other.status == 200 and from_other.headers["x-seaking-cache"].startswith("stale")
    assert [m["id"] for m in from_other.json()["data"]] == list(MODEL_IDS)
    through_front = [await call(client, "GET", front + "/v1/models") for _ in range(4)]
    assert all(a.status == 200 and "x-seaking-cache" in a.headers for a in through_front)

    for process in processes:
        await process.stop()
    served = [len(re.findall(r"POST http://127\.0\.0\.1:\d+/v1/chat/completions", p.output)) for p in processes]
    assert sum(served) == 13 and min(served) >= 3, served  # both took their share of the chat requests
