"""A client that leaves is a normal event, not a crash: wherever in its stream it goes — before the answer, during
heartbeats, at the first event, mid-stream, while a burst is written, while a continuation is fetched — the proxy's
log (a real `mitmdump` subprocess's, all of it) shows no traceback, and the upstream request behind it is let go."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from seaking.lab.fault_upstream import Delayed, Stream, split_words
from test_shutdown import start_mitmdump
from test_streaming import STREAM_CHAT

WORDS = split_words(" ".join(f"w{i}" for i in range(400)))
CONFIG = {"streaming": {"heartbeat_interval": 0.2, "idle_timeout": 0.3}, "target_proxy": {"prefill": "assistant", "timeout": 10}}


async def leave_after(url: str, lines: int, timeout: float = 10) -> None:
    """A client that reads `lines` non-empty lines of its stream (0: none, not even the headers), then leaves."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.post(url + "/v1/chat/completions", json=STREAM_CHAT) as response:
                seen = 0
                async for line in response.content:
                    seen += bool(line.strip())
                    if seen >= lines:
                        return  # leaving the block closes the connection mid-stream
        except TimeoutError:
            pass  # left before the answer


CASES = {
    "before the answer": (lambda: Delayed(1.0, then=Stream(chunks=WORDS)), 0, 0.1),
    "during heartbeats": (lambda: Delayed(2.0, then=Stream(chunks=WORDS)), 1, 10),
    "at the first event": (lambda: Stream(chunks=WORDS, delay=0.01), 1, 10),
    "mid-stream": (lambda: Stream(chunks=WORDS, delay=0.005), 50, 10),
    "in a burst": (lambda: Stream(chunks=WORDS * 20), 3, 10),
    "during a continuation": (lambda: Stream(chunks=WORDS, drop_after=5), 7, 10),
}


@pytest.mark.parametrize("where", list(CASES))
async def test_a_client_leaving_anywhere_leaves_no_traceback(mitmdump, upstream, tmp_path, where):
    fault, lines, timeout = CASES[where]
    proxy, started = await start_mitmdump(mitmdump, upstream, tmp_path, **CONFIG)
    url = started.url
    # The six requests get a fault each; a continuation, after them, is slow.
    slow_continuations = [Delayed(2.0, then=Stream(chunks=WORDS)) for _ in range(6)]
    upstream.script("chat/completions", *(fault() for _ in range(6)), *slow_continuations)
    await asyncio.gather(*(leave_after(url, lines, timeout=timeout) for _ in range(6)))
    async with asyncio.timeout(5):
        while upstream.open_requests:  # each upstream request is let go as its client leaves
            await asyncio.sleep(0.05)
    assert await proxy.stop() == 0
    assert "Traceback" not in proxy.output and "Error handling request" not in proxy.output, proxy.output
