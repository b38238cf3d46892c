"""The benchmark's scenarios and the load generator that drives them: what one round measures, and the requests a
client sends (non-streaming chat completions, streams) with what each one saw (latency, TTFT, gaps between chunks).
Setup and method: bench.py's docstring."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

STREAM_CHUNKS = 20
CHUNK_DELAY = 0.05
FAIL_RATE = 0.3
FAULT_CONCURRENCY = 16
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=180)  # longer than any retry schedule of the default config

CHAT_PATH = "/v1/chat/completions"
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench-not-a-real-key"}


def chat_body(stream: bool, prompt_bytes: int = 0) -> bytes:
    text = "Say hello." if not prompt_bytes else ("lorem ipsum " * (prompt_bytes // 12 + 1))[:prompt_bytes]
    return json.dumps({"model": "model-a", "messages": [{"role": "user", "content": text}], "stream": stream}).encode()


# --- scenarios -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    streaming: bool
    clients: int  # at once (a burst), or in all (spread)
    requests: int  # per client and round for chat; in all per round for streams
    seconds: float = 0  # chat: measure at most this long per round
    spread: float = 0  # streams: start them evenly over this many seconds (0: all at once)
    prompt_bytes: int = 0
    watch_memory: bool = False  # peak RSS and open files of the proxy during the run
    at_scale: bool = False  # run after every other scenario's rounds (see bench())
    only: tuple[str, ...] | None = None  # the ways it is run for (None: all)
    skip: tuple[str, ...] = ()


BUFFERS = ("mitmdump",)  # plain mitmdump buffers whole streams: its stream figures say nothing but that
SLOW_AT_SCALE = ("litellm",)


def scenarios(quick: bool) -> list[Scenario]:
    n = 1 if quick else 2  # waves per round of the smaller stream runs
    found = [
        Scenario("chat_1", "chat, 1 client", False, 1, 300 if quick else 600, seconds=1.0 if quick else 1.5),
        Scenario("chat_16", "chat, 16 clients", False, 16, 60 if quick else 120, seconds=1.0 if quick else 2.0),
        Scenario("stream_1", "stream, 1 stream", True, 1, 2 * n),
        Scenario("stream_16", "stream, 16 streams", True, 16, 16 * n, skip=BUFFERS),
        Scenario("stream_100", "stream, 100 streams", True, 100, 100, watch_memory=True, skip=BUFFERS),
        Scenario("stream_100_spread", "stream, 100 spread over 1 s", True, 100, 100, spread=1.0, skip=BUFFERS),
        Scenario("stream_1000", "stream, 1,000 streams", True, 1000, 1000, watch_memory=True, at_scale=True,
                 skip=BUFFERS + SLOW_AT_SCALE),
    ]
    for kib in (1, 16, 256, 1024):
        found.append(Scenario(f"prompt_{kib}k", f"stream, {kib:,} KiB prompt", True, 1, 2 * n,
                              prompt_bytes=kib * 1024, skip=BUFFERS + SLOW_AT_SCALE))
    return found


def applies(scenario: Scenario, way: str) -> bool:
    return (scenario.only is None or way in scenario.only) and way not in scenario.skip

# --- the load generator --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    ok: bool
    latency: float  # seconds, request sent -> body read (or failure)
    ttft: float | None = None  # streams: request sent -> first data line
    gaps: list[float] = field(default_factory=list)  # streams: between successive data lines
    error: str | None = None  # short, to count failures by kind
    detail: str | None = None  # the start of an error answer's body, for the raw results


async def chat(session: aiohttp.ClientSession, base: str, body: bytes) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(base + CHAT_PATH, data=body, headers=HEADERS) as response:
            answer = await response.read()
            ok = response.status == 200 and b'"choices"' in answer
            error = None if ok else f"HTTP {response.status}"
    except (TimeoutError, aiohttp.ClientError) as e:
        ok, error, answer = False, type(e).__name__, b""
    return Sample(ok, time.perf_counter() - started, error=error, detail=None if ok else excerpt(answer))


async def stream(session: aiohttp.ClientSession, base: str, body: bytes) -> Sample:
    started = time.perf_counter()
    arrivals: list[float] = []
    done = False
    error = detail = None
    try:
        async with session.post(base + CHAT_PATH, data=body, headers=HEADERS) as response:
            if response.status != 200:
                detail = excerpt(await response.read())
                error = f"HTTP {response.status}"
            else:
                async for line in response.content:
                    if line.startswith(b"data:"):
                        arrivals.append(time.perf_counter())
                        done = line.strip() == b"data: [DONE]"
                        # A proxy may end a broken stream cleanly with an error event, and a [DONE] after it.
                        if line.startswith(b'data: {"error"') and error is None:
                            error, detail = "SSE error event", excerpt(line)
                if not done and error is None:
                    error = "no [DONE]"
    except (TimeoutError, aiohttp.ClientError) as e:
        error = type(e).__name__
    return Sample(
        ok=error is None,
        latency=time.perf_counter() - started,
        ttft=arrivals[0] - started if arrivals else None,
        gaps=[later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)],
        error=error,
        detail=detail,
    )


def excerpt(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


@dataclass
class Run:
    samples: list[Sample]
    seconds: float  # wall time of the measured part


async def run_scenario(base: str, scenario: Scenario) -> Run:
    """Chat: `clients` clients in a loop, each on its own keep-alive connection. Streams: `requests` streams in waves
    of `clients` at once, or spread evenly over `spread` seconds."""
    count = scenario.clients
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=CLIENT_TIMEOUT)
                for _ in range(count)]
    body = chat_body(scenario.streaming, scenario.prompt_bytes)
    one = stream if scenario.streaming else chat
    try:
        # Warm-up: connection set-up (client and proxy side) is not what a long-lived SillyTavern session pays.
        await asyncio.gather(*(chat(s, base, chat_body(False)) for s in sessions))
        samples: list[Sample] = []
        started = time.perf_counter()
        if not scenario.streaming:
            stop_at = started + scenario.seconds
            tickets = iter(range(scenario.requests * count))

            async def client(session: aiohttp.ClientSession) -> None:
                while time.perf_counter() < stop_at and next(tickets, None) is not None:
                    samples.append(await one(session, base, body))

            await asyncio.gather(*(client(s) for s in sessions))
        else:
            async def delayed(i: int, session: aiohttp.ClientSession) -> Sample:
                await asyncio.sleep(scenario.spread * i / count)
                return await one(session, base, body)

            for _ in range(max(1, scenario.requests // count)):  # waves
                samples += await asyncio.gather(*(delayed(i, s) for i, s in enumerate(sessions)))
        return Run(samples, time.perf_counter() - started)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
