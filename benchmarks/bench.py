"""What does it cost to reach an OpenAI-compatible upstream through seaking-proxy? Side by side, in one run.

    .venv/bin/python benchmarks/bench.py [--quick] [--rounds N] [--out docs/benchmark.md]
                                         [--ways direct,mitmdump-stream,seaking-proxy] [--addon other/addon.py]

Every way is started once and stays up; then the run goes round by round. In each round every scenario is measured
for every way, the ways taking turns in an order that rotates from round to round, so that whatever else the machine
does falls on all of them alike. The 1,000-stream rounds come after all the others (what a process keeps of them
would otherwise be every later round's memory). Each figure is reported as the median of its rounds with the lowest
and highest round beside it, and each ratio (seaking-proxy ÷ plain mitmdump, ...) is taken within a round, then the
median of those. A difference whose rounds do not all lie on one side of the line it is compared with is called
inside the noise. The load average before and after every round is recorded: a busy machine shows there. Nothing is
asserted: this measures, it does not test. --quick runs 2 short rounds (a few minutes); the full run (5 rounds, all
ways) takes about 20 minutes on 2 cores.

Setup. Separate processes, so that none steals the others' CPU on a small machine: this one (the aiohttp load
generator), the upstream (benchmarks/bench_upstream.py, the tests' FaultyUpstream), and the proxies under test, each
`... --listen-host 127.0.0.1 --listen-port 0`. Every way reaches the same upstream on loopback:
  direct ................ the client talks to the upstream itself
  mitmdump .............. plain `mitmdump --mode reverse:<upstream>`, no addon (it buffers whole responses, SSE too)
  mitmdump-stream ....... the same with `--set stream_large_bodies=1`: the floor for streaming through mitmproxy
  floor ................. `mitmdump -s benchmarks/floor_addon.py`: the same path as seaking-proxy with its work removed
                          (the exchange with aiohttp from the request hook, a loopback relay for streams; no retries,
                          keys, records): the floor of the design, and what its features cost beyond it
  seaking-proxy ......... `mitmdump -s addon.py --mode reverse:<upstream> --set seaking_config=<temp yaml>` (default
                          retry settings; only the /models cache file is moved to a temp directory)
  seaking-haproxy-1 ..... HAProxy (Debian's `haproxy`) on one port in front of one seaking-proxy process
  seaking-haproxy-2 ..... the same in front of two seaking-proxy processes (the scale-out of README "Speed and cost")
  litellm ............... the LiteLLM proxy (1.82.6 in its own venv: benchmarks/litellm_way.py) as a plain
                          OpenAI-compatible passthrough with comparable retries; skipped with a note if it cannot be
                          installed. Not run at 1,000 streams or in the prompt-size sweep (its 100-stream TTFT is
                          already seconds).
Every client keeps its connection alive and warms it up with one request before the measured ones. Every process
runs in a process group of its own, stopped as a group at the end. The soft limit on open files is raised to the hard
limit first (children inherit it): 1,000 streams hold four sockets each in a proxy.

Scenarios (per round):
  chat, N clients ............ non-streaming chat completions from N clients in a loop: req/s, p50/p99 latency
  stream, N streams .......... N streams started at once (a burst); the upstream sends 20 chunks 50 ms apart:
                               TTFT (request sent -> first `data:` line) p50/p99, chunk gap p99, peak RSS and open
                               files of the proxy process(es)
  stream, N spread over 1 s .. the same N streams, started evenly over one second, as real users arrive
  stream, K KiB prompt ....... one stream at a time with a prompt of that size (a long SillyTavern context is
                               hundreds of KiB): TTFT
TTFT overhead = this way's TTFT minus direct's, within the round.
After the rounds, once per way: 16 clients against an upstream that answers a seeded 30 % of attempts 503 (each way
its own upstream, so each meets the same faults): success rate and latency. Direct shows ~70 %: what a client without
retries sees. seaking-proxy's default retry budget (retry_budget in config.yaml) caps retries at a share of the
requests, so under a failure this high and sustained some requests get their 503 at once: by design.

All processes share the machine's cores, so the load generator and the upstream cap the direct figures and the proxies'
include some contention. Compare ways within one run; do not compare runs on different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import litellm_way as litellm_way_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from haproxy import haproxy_config  # noqa: E402  (docs/haproxy.cfg, the README's setup)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent  # run with the project's venv python: its mitmdump is next to it
MITMDUMP = str(BIN / "mitmdump")
LISTEN = ["--listen-host", "127.0.0.1", "--listen-port", "0"]
LISTENING = re.compile(r"listening at (?:http://)?127\.0\.0\.1:(\d+)")

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


# --- processes -----------------------------------------------------------------------------------------------------


class Process:
    """A child process whose output goes to a log file (a full pipe would stall it), in a process group of its own,
    stopped with SIGINT to the whole group (and SIGKILL for whatever of the group is left after 10 s)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEAKING_")}  # measure the config we wrote
            cwd = REPO
        else:
            cwd = workdir
        env = {**env, "PYTHONUNBUFFERED": "1"}  # the "listening at" line must reach the log at once
        self.started = time.perf_counter()
        self.start_seconds: float | None = None
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    async def port(self, ready: re.Pattern, timeout: float = 30, health: str | None = None) -> int:
        """The port it listens on, once it says so (and `health` answers 200 there). Sets start_seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready.search(self.log_path.read_text(errors="replace"))
            if found:
                port = int(found.group(1))
                if health:
                    await self._healthy(f"http://127.0.0.1:{port}{health}", deadline)
                self.start_seconds = time.perf_counter() - self.started
                # mitmdump says it is listening before it gives up on a script that fails to load.
                await asyncio.sleep(0.3)
                self.check_alive()
                return port
            self.check_alive()
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not say it was listening within {timeout} s:\n{self.log_tail()}")

    async def accepting(self, port: int, timeout: float = 15) -> None:
        """Wait until it accepts connections on `port` (for a process that does not say so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                self.start_seconds = time.perf_counter() - self.started
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not accept connections on {port} within {timeout} s:\n{self.log_tail()}")

    async def _healthy(self, url: str, deadline: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name}: {url} did not answer 200 in time:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def group(self) -> list[int]:
        """The processes still in this process's group (its children that did not leave it), itself included."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[2] == str(self.pid) and fields[0] != "Z":  # pgrp; zombies are gone already
                members.append(int(stat.parent.name))
        return members

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        deadline = time.monotonic() + 2
        while self.group() and time.monotonic() < deadline:  # children may take a moment after their parent
            time.sleep(0.05)
        if self.group():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()


async def start(name: str, argv: list[str], workdir: Path, ready: re.Pattern = LISTENING,
                env: Mapping[str, str] | None = None, timeout: float = 30,
                health: str | None = None) -> tuple[Process, int]:
    process = Process(name, argv, workdir, env)
    try:
        return process, await process.port(ready, timeout, health)
    except BaseException:
        process.stop()
        raise


@contextlib.asynccontextmanager
async def upstream(fail_rate: float, workdir: Path, label: str) -> AsyncIterator[str]:
    """A fresh bench_upstream.py process; its URL."""
    argv = [sys.executable, str(HERE / "bench_upstream.py"), "--chunks", str(STREAM_CHUNKS),
            "--chunk-delay", str(CHUNK_DELAY), "--fail-rate", str(fail_rate)]
    process, port = await start(f"upstream-{label}", argv, workdir)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


# --- the ways of reaching the upstream -----------------------------------------------------------------------------


@dataclass
class Reached:
    base: str  # the URL the client talks to
    processes: list[Process] = field(default_factory=list)  # the proxy's processes (memory is summed over them)

    @property
    def start_seconds(self) -> float | None:
        times = [p.start_seconds for p in self.processes if p.start_seconds is not None]
        return max(times) if times else None


# A way: (upstream URL, private workdir, label) -> an async context manager giving what the client reaches.
Starter = Callable[[str, Path, str], contextlib.AbstractAsyncContextManager[Reached]]


@dataclass(frozen=True)
class Way:
    name: str
    start: Starter


@contextlib.asynccontextmanager
async def direct(target: str, workdir: Path, label: str) -> AsyncIterator[Reached]:
    yield Reached(target)


def mitmdump_way(*extra: str) -> Starter:
    @contextlib.asynccontextmanager
    async def run(target: str, workdir: Path, label: str) -> AsyncIterator[Reached]:
        process, port = await start(label, [MITMDUMP, "--mode", f"reverse:{target}", *LISTEN, *extra], workdir)
        try:
            yield Reached(f"http://127.0.0.1:{port}", [process])
        finally:
            process.stop()

    return run


def seaking_config(workdir: Path) -> Path:
    config = workdir / "seaking.yaml"
    # Only the /models cache moves (the user's own cache stays untouched); retries keep their defaults. The processes
    # behind HAProxy share this file, and so the cache, as users who scale out do.
    config.write_text(f"models:\n  cache_file: {json.dumps(str(workdir / 'models.json'))}\n")
    return config


def seaking_way(addon: Path) -> Starter:
    @contextlib.asynccontextmanager
    async def run(target: str, workdir: Path, label: str) -> AsyncIterator[Reached]:
        config = f"seaking_config={seaking_config(workdir)}"
        async with mitmdump_way("-s", str(addon), "--set", config)(target, workdir, label) as reached:
            yield reached

    return run


def seaking_processes(addon: Path, count: int) -> Starter:
    """`count` seaking-proxy processes behind HAProxy on one port."""

    @contextlib.asynccontextmanager
    async def run(target: str, workdir: Path, label: str) -> AsyncIterator[Reached]:
        config = seaking_config(workdir)
        async with contextlib.AsyncExitStack() as stack:
            started = []
            for i in range(count):
                argv = [MITMDUMP, "-s", str(addon), "--mode", f"reverse:{target}", *LISTEN,
                        "--set", f"seaking_config={config}"]
                process, port = await start(f"{label}-seaking{i + 1}", argv, workdir)
                stack.callback(process.stop)
                started.append((process, port))
            port = free_port()
            haproxy_cfg = workdir / f"{label}.cfg"
            haproxy_cfg.write_text(haproxy_config(port, [port for _, port in started]))
            haproxy = Process(f"{label}-haproxy", [shutil.which("haproxy") or "haproxy", "-db", "-f", str(haproxy_cfg)],
                              workdir)
            stack.callback(haproxy.stop)
            await haproxy.accepting(port)
            yield Reached(f"http://127.0.0.1:{port}", [p for p, _ in started] + [haproxy])

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def litellm_starter(python: Path) -> Starter:
    @contextlib.asynccontextmanager
    async def run(target: str, workdir: Path, label: str) -> AsyncIterator[Reached]:
        process, port = await start(label, litellm_way_module.command(python, target, workdir), workdir,
                                    litellm_way_module.READY, litellm_way_module.environment(),
                                    litellm_way_module.START_TIMEOUT, "/health/liveliness")
        try:
            yield Reached(f"http://127.0.0.1:{port}", [process])
        finally:
            process.stop()

    return run


def all_ways(addon: Path, litellm_python: Path) -> list[Way]:
    return [
        Way("direct", direct),
        Way("mitmdump", mitmdump_way()),
        Way("mitmdump-stream", mitmdump_way("--set", "stream_large_bodies=1")),
        Way("floor", mitmdump_way("-s", str(HERE / "floor_addon.py"))),
        Way("seaking-proxy", seaking_way(addon)),
        Way("seaking-haproxy-1", seaking_processes(addon, 1)),
        Way("seaking-haproxy-2", seaking_processes(addon, 2)),
        Way("litellm", litellm_starter(litellm_python)),
    ]


WAY_NAMES = [w.name for w in all_ways(Path("addon.py"), Path("python"))]


# --- memory and open files -----------------------------------------------------------------------------------------


def status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0), so it shows this run's peak, not start-up's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def watch_processes(pids: list[int], into: dict) -> AsyncIterator[None]:
    """Peak resident memory (MiB, summed over the processes) and peak open files during the block, into `into`."""
    exact = all(reset_peak_rss(pid) for pid in pids)
    rss_samples: list[int] = []
    fd_samples: list[int] = []

    async def sample() -> None:
        while True:
            rss_samples.append(sum(status_kib(pid, "VmRSS") or 0 for pid in pids))
            fd_samples.append(sum(open_files(pid) for pid in pids))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield
    finally:
        sampler.cancel()
        peak = sum(status_kib(pid, "VmHWM") or 0 for pid in pids) if exact else 0
        into["peak_rss_mib"] = round((peak or max(rss_samples, default=0)) / 1024, 1)
        into["peak_open_files"] = max(fd_samples, default=0)


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


# --- summaries -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def errors_of(run: Run) -> dict[str, int | str]:
    """Failures counted by kind, and the body of the first failed answer as an example."""
    counts: dict[str, int | str] = {}
    for s in run.samples:
        if not s.ok:
            counts[s.error or "?"] = counts.get(s.error or "?", 0) + 1
            if s.detail and "example" not in counts:
                counts["example"] = s.detail
    return counts


def summarise(scenario: Scenario, run: Run) -> dict:
    ok = [s for s in run.samples if s.ok]
    summary = {"count": len(run.samples), "failed": len(run.samples) - len(ok), "seconds": round(run.seconds, 3)}
    if run.samples and len(ok) < len(run.samples):
        summary["errors"] = errors_of(run)
    if not scenario.streaming:
        latencies = [s.latency for s in ok]
        summary.update(rps=round(len(ok) / run.seconds, 1) if run.seconds else None,
                       p50_ms=ms(percentile(latencies, 50)), p99_ms=ms(percentile(latencies, 99)))
    else:
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        gaps = [g for s in ok for g in s.gaps]
        summary.update(ttft_p50_ms=ms(percentile(ttfts, 50)), ttft_p99_ms=ms(percentile(ttfts, 99)),
                       gap_p99_ms=ms(percentile(gaps, 99)))
    return summary


def summarise_faults(run: Run) -> dict:
    latencies = [s.latency for s in run.samples]
    ok = sum(s.ok for s in run.samples)
    return {
        "requests": len(run.samples), "errors": errors_of(run), "seconds": round(run.seconds, 3),
        "success_pct": round(100 * ok / len(run.samples), 1) if run.samples else None,
        "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
    }


def add_overheads(round_results: dict[str, dict]) -> None:
    """TTFT overhead over direct, within one round."""
    direct_results = round_results.get("direct", {})
    for measured in round_results.values():
        for key, summary in measured.items():
            base = direct_results.get(key) or {}
            for q in ("p50", "p99"):
                mine, theirs = summary.get(f"ttft_{q}_ms"), base.get(f"ttft_{q}_ms")
                if mine is not None and theirs is not None:
                    summary[f"ttft_overhead_{q}_ms"] = round(mine - theirs, 2)


# --- the run -------------------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


async def bench(ways: list[Way], plan: list[Scenario], rounds: int, fault_requests: int, workdir: Path,
                skipped: dict[str, str]) -> dict:
    raw: dict = {"rounds": [], "startup": {}, "idle_rss_mib": {}, "faults": {}, "broken": {}}
    reached: dict[str, Reached] = {}
    async with contextlib.AsyncExitStack() as stack:
        clean = await stack.enter_async_context(upstream(0.0, workdir, "clean"))
        for way in ways:
            if way.name in skipped:
                progress(f"{way.name}: skipped: {skipped[way.name]}")
                continue
            progress(f"starting {way.name} ...")
            try:
                reached[way.name] = await stack.enter_async_context(way.start(clean, workdir, way.name))
            except Exception as e:  # one broken way (the addon is being edited) must not cost the others' figures
                progress(f"  {way.name} failed to start: {e}")
                raw["broken"][way.name] = f"{type(e).__name__}: {e}"
        await asyncio.sleep(1)  # let start-up settle before reading idle memory
        for name, where in reached.items():
            raw["startup"][name] = where.start_seconds and round(where.start_seconds, 2)
            if where.processes:
                idle = sum(status_kib(p.pid, "VmRSS") or 0 for p in where.processes)
                raw["idle_rss_mib"][name] = round(idle / 1024, 1)
        names = list(reached)

        async def measure(scenario: Scenario, number: int, results: dict) -> None:
            """One scenario for every way, in an order that rotates with the round."""
            progress(f"round {number + 1}/{rounds}: {scenario.label}")
            for name in names[number % len(names):] + names[:number % len(names)]:
                if not applies(scenario, name) or name in raw["broken"]:
                    continue
                where = reached[name]
                summary: dict = {}
                pids = [p.pid for p in where.processes]
                watch = watch_processes(pids, summary) if scenario.watch_memory and pids else None
                try:
                    async with watch or contextlib.nullcontext():
                        run = await run_scenario(where.base, scenario)
                    for process in where.processes:
                        process.check_alive()
                except Exception as e:
                    progress(f"  {name} broke: {e}")
                    raw["broken"][name] = f"{type(e).__name__}: {e}"
                    continue
                results[name][scenario.key] = {**summarise(scenario, run), **summary}

        # The runs at scale come after all the others: what a process keeps of 1,000 streams (Python seldom gives
        # memory back) would otherwise be every later round's peak memory.
        for phase in ([s for s in plan if not s.at_scale], [s for s in plan if s.at_scale]):
            for number in range(rounds if phase else 0):
                if len(raw["rounds"]) <= number:
                    raw["rounds"].append({"load": [], "results": {name: {} for name in names}})
                this_round = raw["rounds"][number]
                this_round["load"].append(load_average())
                for scenario in phase:
                    await measure(scenario, number, this_round["results"])
                this_round["load"].append(load_average())
        for this_round in raw["rounds"]:
            add_overheads(this_round["results"])
    # Faults: one fresh flaky upstream per way, started after the rounds, so that each way meets the same faults.
    for way in ways:
        if way.name not in reached or way.name.startswith("seaking-haproxy") or way.name in raw["broken"]:
            continue
        faults = Scenario("faults", "faults", False, FAULT_CONCURRENCY, fault_requests // FAULT_CONCURRENCY, seconds=15)
        async with contextlib.AsyncExitStack() as stack:
            flaky = await stack.enter_async_context(upstream(FAIL_RATE, workdir, f"flaky-{way.name}"))
            where = await stack.enter_async_context(way.start(flaky, workdir, f"{way.name}-flaky"))
            progress(f"{way.name}: {FAIL_RATE:.0%} 503, {FAULT_CONCURRENCY} clients")
            raw["faults"][way.name] = summarise_faults(await run_scenario(where.base, faults))
    return raw


# --- aggregation: medians of rounds, ratios within rounds ------------------------------------------------------------


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "rounds": len(values)}


def per_round(raw: dict, way: str, scenario: str, key: str) -> list[float | None]:
    return [(r["results"].get(way, {}).get(scenario) or {}).get(key) for r in raw["rounds"]]


def aggregate(raw: dict, ways: list[str], plan: list[Scenario]) -> dict:
    keys = ("rps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "ttft_overhead_p50_ms", "ttft_overhead_p99_ms",
            "gap_p99_ms", "peak_rss_mib", "peak_open_files", "failed")
    result: dict = {}
    for way in ways:
        for scenario in plan:
            for key in keys:
                found = spread(per_round(raw, way, scenario.key, key))
                if found:
                    result.setdefault(way, {}).setdefault(scenario.key, {})[key] = found
    return result


def ratio_spread(raw: dict, way: str, base: str, scenario: str, key: str) -> dict | None:
    """The ratio way ÷ base taken within each round, then its median and range."""
    mine, theirs = per_round(raw, way, scenario, key), per_round(raw, base, scenario, key)
    return spread([m / t for m, t in zip(mine, theirs, strict=True) if m is not None and t])


@dataclass(frozen=True)
class Goal:
    label: str
    scenario: str
    key: str
    base: str
    limit: float
    higher_is_better: bool = False

    def verdict(self, found: dict | None) -> str:
        if not found:
            return "not measured"
        worst, best = (found["min"], found["max"]) if self.higher_is_better else (found["max"], found["min"])
        if self.holds(worst):
            return "met"
        return "inside the noise" if self.holds(best) else "missed"

    def holds(self, ratio: float) -> bool:
        return ratio >= self.limit if self.higher_is_better else ratio <= self.limit


GOALS = [
    Goal("non-stream latency p50, 1 client, ÷ plain mitmdump", "chat_1", "p50_ms", "mitmdump", 1.2),
    Goal("non-stream throughput, 16 clients, ÷ plain mitmdump", "chat_16", "rps", "mitmdump", 0.95, True),
    Goal("stream TTFT overhead p50, 16 streams, ÷ mitmdump-stream", "stream_16", "ttft_overhead_p50_ms",
         "mitmdump-stream", 1.2),
    Goal("stream TTFT overhead p50, 100 streams, ÷ mitmdump-stream", "stream_100", "ttft_overhead_p50_ms",
         "mitmdump-stream", 1.2),
    Goal("peak RSS at 100 streams ÷ mitmdump-stream", "stream_100", "peak_rss_mib", "mitmdump-stream", 1.1),
]
# Further ratios worth a line in the report (no goal): (label, scenario, key, way, base).
RATIOS = [
    ("stream TTFT overhead p50, 100 spread over 1 s, ÷ mitmdump-stream", "stream_100_spread", "ttft_overhead_p50_ms",
     "seaking-proxy", "mitmdump-stream"),
    ("stream TTFT p50, 1,000 streams, ÷ mitmdump-stream", "stream_1000", "ttft_p50_ms", "seaking-proxy",
     "mitmdump-stream"),
    ("peak RSS at 1,000 streams ÷ mitmdump-stream", "stream_1000", "peak_rss_mib", "seaking-proxy", "mitmdump-stream"),
    ("stream TTFT p50, 1 MiB prompt, ÷ mitmdump-stream", "prompt_1024k", "ttft_p50_ms", "seaking-proxy",
     "mitmdump-stream"),
    ("chat throughput, 16 clients: 2 processes ÷ 1 behind HAProxy", "chat_16", "rps", "seaking-haproxy-2",
     "seaking-haproxy-1"),
    ("stream TTFT p50, 100 streams: 2 processes ÷ 1 behind HAProxy", "stream_100", "ttft_p50_ms", "seaking-haproxy-2",
     "seaking-haproxy-1"),
    ("stream TTFT p50, 1,000 streams: 2 processes ÷ 1 behind HAProxy", "stream_1000", "ttft_p50_ms",
     "seaking-haproxy-2", "seaking-haproxy-1"),
    ("chat latency p50, 1 client: HAProxy + 1 process ÷ seaking-proxy alone", "chat_1", "p50_ms", "seaking-haproxy-1",
     "seaking-proxy"),
]


def ratios(raw: dict) -> dict:
    found = {g.label: {**(ratio_spread(raw, "seaking-proxy", g.base, g.scenario, g.key) or {}), "goal": g.limit,
                       "higher_is_better": g.higher_is_better} for g in GOALS}
    for goal in GOALS:
        measured = found[goal.label] if "median" in found[goal.label] else None
        found[goal.label]["verdict"] = goal.verdict(measured)
        # The same ratio for the floor of the design: where it misses the goal too, no addon code can meet it.
        floor = ratio_spread(raw, "floor", goal.base, goal.scenario, goal.key)
        if floor:
            found[goal.label]["floor"] = {**floor, "verdict": goal.verdict(floor)}
    for label, scenario, key, way, base in RATIOS:
        found[label] = ratio_spread(raw, way, base, scenario, key) or {}
    return found


# --- the report ----------------------------------------------------------------------------------------------------


FIGURES = [  # (label suffix, key, unit)
    ("throughput", "rps", "req/s"), ("latency p50", "p50_ms", "ms"), ("latency p99", "p99_ms", "ms"),
    ("TTFT p50", "ttft_p50_ms", "ms"), ("TTFT p99", "ttft_p99_ms", "ms"),
    ("TTFT overhead p50", "ttft_overhead_p50_ms", "ms"), ("chunk gap p99", "gap_p99_ms", "ms"),
    ("peak RSS", "peak_rss_mib", "MiB"), ("peak open files", "peak_open_files", "count"),
    ("failed", "failed", "count"),
]


def fmt(number: float | None) -> str:
    if number is None:
        return "—"
    if abs(number) >= 100 or number == int(number):
        return f"{number:,.0f}"
    return f"{number:.1f}" if abs(number) >= 10 else f"{number:.2f}"


def cell(found: dict | None) -> str:
    if not found:
        return "—"
    if found["rounds"] == 1 or found["min"] == found["max"]:
        return fmt(found["median"])
    return f"{fmt(found['median'])} ({fmt(found['min'])}–{fmt(found['max'])})"


def markdown_tables(agg: dict, found_ratios: dict, raw: dict, ways: list[str], plan: list[Scenario]) -> str:
    lines = ["## Goals (issue 12): ratios within a round, median (lowest–highest round)", "",
             "The floor is the same path with the addon's work removed (benchmarks/floor_addon.py): where it misses a "
             "goal too, the design itself is the limit, not the addon's code.", "",
             "| figure | seaking-proxy | verdict | floor of the design | its verdict | goal |",
             "|---|---:|---|---:|---|---:|"]
    for goal in GOALS:
        found = found_ratios[goal.label]
        floor = found.get("floor") or {}
        sign = "≥" if goal.higher_is_better else "≤"
        lines.append(f"| {goal.label} | {cell(found if 'median' in found else None)} | {found['verdict']} | "
                     f"{cell(floor or None)} | {floor.get('verdict', 'not measured')} | {sign} {goal.limit} |")
    lines += ["", "| further ratio | median (lowest–highest round) |", "|---|---:|"]
    for label, *_ in RATIOS:
        found = found_ratios.get(label) or {}
        lines.append(f"| {label} | {cell(found if 'median' in found else None)} |")
    lines += ["", "## Every figure: median of the rounds (lowest–highest round)", "",
              "| scenario | figure | unit | " + " | ".join(ways) + " |", "|---|---|---|" + "---:|" * len(ways)]
    for scenario in plan:
        for suffix, key, unit in FIGURES:
            cells = [cell(agg.get(w, {}).get(scenario.key, {}).get(key)) for w in ways]
            if all(c == "—" for c in cells) or (key == "failed" and all(c in ("0", "—") for c in cells)):
                continue
            lines.append(f"| {scenario.label} | {suffix} | {unit} | " + " | ".join(cells) + " |")
    lines += ["", "## Once per way", "", "| figure | unit | " + " | ".join(ways) + " |",
              "|---|---|" + "---:|" * len(ways)]
    lines.append("| start-up, until it serves | s | " + " | ".join(fmt(raw["startup"].get(w)) for w in ways) + " |")
    idle = [fmt(raw["idle_rss_mib"].get(w)) for w in ways]
    lines.append("| RSS, idle after start-up | MiB | " + " | ".join(idle) + " |")
    for suffix, key, unit in (("success", "success_pct", "%"), ("latency p50", "p50_ms", "ms"),
                              ("latency p99", "p99_ms", "ms")):
        lines.append(f"| {FAIL_RATE:.0%} 503: {suffix} | {unit} | "
                     + " | ".join(fmt((raw["faults"].get(w) or {}).get(key)) for w in ways) + " |")
    for w, why in raw.get("broken", {}).items():
        lines += ["", f"**{w}** broke during the run (its figures are partial or missing):", "", "```text", why, "```"]
    return "\n".join(lines)


def summary(agg: dict, found_ratios: dict, raw: dict, ways: list[str]) -> list[str]:
    """Plain lines from this run's figures; what is inside the noise is called so."""
    def med(way: str, scenario: str, key: str) -> float | None:
        return ((agg.get(way) or {}).get(scenario) or {}).get(key, {}).get("median")

    lines = []
    for goal in GOALS:
        found = found_ratios[goal.label]
        if "median" in found:
            floor = found.get("floor")
            floor_text = f"; the design's floor: {fmt(floor['median'])}, {floor['verdict']}" if floor else ""
            rounds = f"rounds {fmt(found['min'])}–{fmt(found['max'])}"
            goal_text = f"goal {'≥' if goal.higher_is_better else '≤'} {goal.limit}"
            lines.append(
                f"- {goal.label}: **{fmt(found['median'])}** ({rounds}; {goal_text}): {found['verdict']}{floor_text}."
            )
    scale = [label for label, *_ in RATIOS if "processes" in label and "median" in (found_ratios.get(label) or {})]
    for label in scale:
        found = found_ratios[label]
        lines.append(f"- {label}: {cell(found)}.")
    if med("seaking-proxy", "stream_1000", "ttft_p50_ms") is not None:
        lines.append(f"- 1,000 streams at once: seaking-proxy TTFT p50 "
                     f"{fmt(med('seaking-proxy', 'stream_1000', 'ttft_p50_ms'))} ms (mitmdump-stream "
                     f"{fmt(med('mitmdump-stream', 'stream_1000', 'ttft_p50_ms'))}), peak RSS "
                     f"{fmt(med('seaking-proxy', 'stream_1000', 'peak_rss_mib'))} MiB, peak open files "
                     f"{fmt(med('seaking-proxy', 'stream_1000', 'peak_open_files'))}.")
    loads = [load for r in raw["rounds"] for load in r["load"]]
    if loads:
        lines.append(f"- Load average over the rounds {fmt(min(loads))}–{fmt(max(loads))} on {os.cpu_count()} CPUs. "
                     "A verdict \"inside the noise\" means the rounds fell on both sides of the goal.")
    return lines


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(quick: bool, rounds: int, litellm: dict) -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        # Other work on the machine skews every figure; a load near 0 before the run means a quiet machine.
        "load_average_before": load_average(),
        "revision": git_revision(),
        "mode": "quick" if quick else "full",
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mitmproxy": importlib.metadata.version("mitmproxy"),
        "aiohttp": aiohttp.__version__,
        "haproxy": haproxy_version(),
        "litellm": litellm,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "upstream": {"stream_chunks": STREAM_CHUNKS, "chunk_delay_s": CHUNK_DELAY, "fail_rate": FAIL_RATE},
    }


def haproxy_version() -> str | None:
    found = shutil.which("haproxy")
    if not found:
        return None
    out = subprocess.run([found, "-v"], capture_output=True, text=True).stdout
    return (out.split()[2] if out.startswith("HAProxy version") else out.splitlines()[0]) if out else None


def report(raw: dict, ways: list[str], plan: list[Scenario], plot_note: str) -> tuple[str, str]:
    """(tables for the terminal, the whole markdown document)."""
    env = raw["environment"]
    tables = markdown_tables(raw["aggregate"], raw["ratios"], raw, ways, plan)
    legend = __doc__.split("Setup.", 1)[1]
    litellm = env.get("litellm") or {}
    versions = (f"Python {env['python']}, mitmproxy {env['mitmproxy']}, aiohttp {env['aiohttp']}"
                + (f", HAProxy {env['haproxy']}" if env.get("haproxy") else "")
                + (f", LiteLLM {litellm['version']}" if litellm.get("version") else ""))
    document = "\n".join([
        "# seaking-proxy benchmark",
        "",
        *summary(raw["aggregate"], raw["ratios"], raw, ways),
        "",
        (f"{env['date']}, revision {env['revision']}, {env['mode']} run of {env['rounds']} rounds "
         f"({raw['run_seconds']:.0f} s), {env['cpus']} CPUs (load average before: {env['load_average_before']}, "
         f"after: {env.get('load_average_after', '?')}), {versions}, open files limit {env['open_files_limit']}."),
        "Produced by `benchmarks/bench.py`" + (" --quick" if env["mode"] == "quick" else "") + "; setup and method in "
        "its docstring (and below).",
        "",
        plot_note,
        "",
        tables,
        "",
        "## Setup and method",
        "",
        "```text",
        ("Setup." + legend).rstrip(),
        "```",
        "",
        "The raw results of every round are in the JSON file beside this one.",
        "",
    ])
    return tables, document


# --- command line --------------------------------------------------------------------------------------------------


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 short rounds, about three minutes")
    parser.add_argument("--rounds", type=int, help="rounds (default: 2 with --quick, else 5)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark.md"), help="markdown report to write")
    parser.add_argument("--ways", default=",".join(WAY_NAMES),
                        help="comma-separated subset of: " + ", ".join(WAY_NAMES))
    parser.add_argument("--scenarios", help="comma-separated subset of the scenario keys (default: all)")
    parser.add_argument("--addon", default=str(REPO / "addon.py"), help="seaking-proxy's addon.py (e.g. of another "
                        "checkout); default: this repository's")
    args = parser.parse_args()
    wanted = args.ways.split(",")
    unknown = set(wanted) - set(WAY_NAMES)
    if unknown:
        parser.error(f"unknown way(s): {', '.join(sorted(unknown))}")
    plan = scenarios(args.quick)
    if args.scenarios:
        keys = args.scenarios.split(",")
        if set(keys) - {s.key for s in plan}:
            parser.error(f"unknown scenario(s); known: {', '.join(s.key for s in plan)}")
        plan = [s for s in plan if s.key in keys]
    rounds = args.rounds or (2 if args.quick else 5)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with `&` from a script, SIGINT is ignored, and children would inherit that: SIGINT could not stop
        # them. Any handler here is reset to the default in a child.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_open_files_limit()

    # LiteLLM's venv is built (or found) before the clock starts: installing it is no part of any way's figures.
    skipped: dict[str, str] = {}
    litellm: dict = {"version": None, "venv": str(litellm_way_module.venv_dir())}
    litellm_python = Path("python")
    if "litellm" in wanted:
        try:
            litellm_python, install_seconds = litellm_way_module.ensure_venv(progress)
            litellm.update(version=litellm_way_module.VERSION, install_seconds=install_seconds)
        except litellm_way_module.Unavailable as e:
            skipped["litellm"] = f"LiteLLM could not be installed into its venv: {e}"
            litellm["unavailable"] = skipped["litellm"]
    if any(w.startswith("seaking-haproxy") for w in wanted) and not shutil.which("haproxy"):
        for w in wanted:
            if w.startswith("seaking-haproxy"):
                skipped[w] = "haproxy is not installed (Debian: apt-get install haproxy)"
    ways = [w for w in all_ways(Path(args.addon).resolve(), litellm_python) if w.name in wanted]

    env = environment(args.quick, rounds, litellm)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seaking-bench-") as workdir:
        raw = asyncio.run(bench(ways, plan, rounds, 400 if args.quick else 1600, Path(workdir), skipped))
    raw["run_seconds"] = round(time.monotonic() - started, 1)
    env["load_average_after"] = load_average()
    names = [w.name for w in ways if w.name not in skipped]
    raw.update(environment=env, ways=names, plan=[asdict(s) for s in plan], skipped=skipped)
    raw["aggregate"] = aggregate(raw, names, plan)
    raw["ratios"] = ratios(raw)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))  # for `plot.py RAW.json OUT.png` or a closer look
    plot_note = draw_plot(raw, out.with_suffix(".png"), litellm_python)
    tables, document = report(raw, names, plan, plot_note)
    print(tables)
    out.write_text(document)
    progress(f"\nwritten to {out} ({raw['run_seconds']:.0f} s); {plot_note}")


def draw_plot(raw: dict, png: Path, litellm_python: Path) -> str:
    """Draws benchmarks/plot.py's PNG with whichever python has matplotlib: this one, or the LiteLLM venv's. The
    markdown that shows it, or a note saying why there is none (an old PNG is then removed: it would mislead)."""
    plotting = os.environ.get("SEAKING_PLOT_PYTHON")  # a python with matplotlib, when the LiteLLM venv is not built
    if plotting:
        python = Path(plotting)
    elif importlib.util.find_spec("matplotlib") is not None:
        python = Path(sys.executable)
    elif litellm_python.exists() and litellm_way_module.has_matplotlib(litellm_python):
        python = litellm_python
    else:
        png.unlink(missing_ok=True)
        return ("No plot: matplotlib is not importable here nor in LiteLLM's venv "
                "(`pip install -r benchmarks/requirements.txt` into a venv that runs bench.py).")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    try:
        done = subprocess.run([str(python), str(HERE / "plot.py"), f.name, str(png)], capture_output=True, text=True,
                              timeout=180, check=False)
    except subprocess.TimeoutExpired:
        done = None
    finally:
        os.unlink(f.name)
    if done is None or done.returncode != 0:
        png.unlink(missing_ok=True)
        why = "it took over 180 s" if done is None else " ".join(done.stderr.strip().splitlines()[-1:])
        return f"No plot: benchmarks/plot.py failed ({why})."
    return f"![The main figures, one bar per way: medians of the rounds, lines from lowest to highest]({png.name})"


if __name__ == "__main__":
    main()
