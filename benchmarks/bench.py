"""What does it cost to reach an OpenAI-compatible upstream through seaking-proxy? Side by side, in one run.

    /work/main/.venv/bin/python benchmarks/bench.py [--quick] [--out docs/benchmark.md] [--ways direct,seaking-proxy]
                                                    [--addon other/checkout/addon.py]

--quick shrinks every run so the whole benchmark takes about a minute and a half (and skips the larger stream runs of
a way whose streams all failed); without it, a few minutes. The markdown table is printed and written to --out together
with a short summary and the raw results as JSON, and a PNG of the main figures beside it (--out's name, .png) when
matplotlib can be had. Nothing is asserted: this measures, it does not test.

Setup. Three kinds of process, so that none steals the others' CPU on a small machine: this one (the aiohttp load
generator), the upstream (benchmarks/bench_upstream.py, the tests' FaultyUpstream: one clean upstream for the whole run,
and per way a fresh one answering a seeded 30 % of chat completions with 503, so each way meets the same faults), and
the proxy under test, started per way and upstream as `... --listen-host 127.0.0.1 --listen-port 0`. Every way reaches
the same upstream on loopback:
  direct ............ the client talks to the upstream itself
  mitmdump .......... plain `mitmdump --mode reverse:<upstream>`, no addon
  mitmdump-stream ... the same with `--set stream_large_bodies=1`: plain mitmdump buffers whole responses, SSE included,
                      so this is the baseline for what streaming through mitmproxy can cost
  seaking-proxy ..... `mitmdump -s addon.py --mode reverse:<upstream> --set seaking_config=<temp yaml>` (default retry
                      settings; only the /models cache file is moved to a temp directory)
  litellm ........... the LiteLLM proxy (`litellm --config <temp yaml> --host 127.0.0.1 --port <free port>`, one
                      uvicorn worker) as a plain OpenAI-compatible passthrough: every model name goes to openai/<name>
                      at the upstream; 3 retries at least 1 s apart (LiteLLM's own back-off: 1, 1, 2 s plus up to
                      0.75 s jitter each; 1.82.6 also sleeps ~4 s after the last failed attempt before it answers),
                      30 s per attempt, the OpenAI SDK's own retries off. No database, no master key, no admin UI, no
                      telemetry, no download of the model cost map. LiteLLM lives in a venv of its own
                      (benchmarks/requirements.txt, pinned), built once at ~/.cache/seaking-proxy/litellm-venv before
                      the clock starts; see benchmarks/litellm_way.py. If it cannot be installed or does not start,
                      its column says why and the other ways are measured as usual.
Another way is one more `Way` in all_ways(). Every client keeps its connection alive, and warms it up with one request
before the measured ones. Every process started runs in a process group of its own, stopped as a group at the end.

What the figures mean:
  chat, N clients .......... non-streaming chat completions from N clients in a loop, each waiting for its answer:
                             req/s (successful answers per second of wall time), p50/p99 latency (request sent ->
                             whole body read).
  stream, N streams ........ N clients each reading a streamed chat completion ("stream": true; the upstream sends
                             20 chunks 50 ms apart, then a finish chunk and `data: [DONE]` at once):
                             TTFT = request sent -> first `data:` line; TTFT overhead = this way's TTFT percentile
                             minus direct's (a difference of two noisy numbers: a p99 can even come out negative);
                             chunk gap = time between successive `data:` lines, pooled over all
                             streams (direct: mean ~45 ms, p99 ~50 ms; a proxy that buffers the response shows a TTFT of
                             the whole stream, ~1 s, and gaps near 0).
  failed (clean upstream) .. requests and streams of the runs above that did not end in a 200 with a complete body.
  proxy start-up ........... from starting the process until it says it is listening (LiteLLM: and answers its
                             /health/liveliness with 200).
  proxy RSS ................ resident memory of the proxy process when idle after start-up, and its peak during the
                             100-stream run (VmHWM after resetting it, else the highest VmRSS sampled every 20 ms).
  30 % 503 ................. 16 clients against the flaky upstream: success rate (200 with a body) and p50/p99
                             latency of all answers. Direct shows ~70 %: that is what a client without retries sees.
                             A retrying proxy's p99 is its back-off (config defaults); while clients wait for a retry
                             the proxy is less loaded, so its p50 may even beat plain mitmdump's. seaking-proxy's
                             default retry budget lets retries add only a share of the requests (retry_budget in
                             config.py); a failure rate this high and this sustained spends it, and requests over
                             budget get their 503 at once: that, not its retries giving up, is what keeps its success
                             under 100 %.
  Ratios ................... this way's figure ÷ direct's, and ÷ plain mitmdump's. Higher is better for req/s and
                             success; lower for everything else.

Notes:
  All processes share two cores, so the load generator and the upstream cap the direct figures, and the proxy's figures
  include some contention. Compare ways within one run; do not compare runs on different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import litellm_way as litellm_way_module

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
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=120)  # longer than any retry schedule of the default config

CHAT_PATH = "/v1/chat/completions"
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench-not-a-real-key"}
MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT_BODY = json.dumps({"model": "model-a", "messages": MESSAGES}).encode()
STREAM_BODY = json.dumps({"model": "model-a", "messages": MESSAGES, "stream": True}).encode()


# --- the ways of reaching the upstream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    name: str
    # argv of the proxy for this upstream URL, given a private temp directory; None: the client goes direct.
    command: Callable[[str, Path], list[str]] | None = None
    ready: re.Pattern = LISTENING  # its output says it accepts connections; group 1 is the port
    # The proxy's whole environment; None: ours, less SEAKING_* (measure the config we wrote). A proxy with an
    # environment of its own also runs in the private temp directory rather than in the repository.
    env: Mapping[str, str] | None = None
    start_timeout: float = 30  # seconds until `ready`, and `health` answering 200
    health: str | None = None  # a path that answers 200 once the proxy serves requests, polled after `ready`


def seaking_command(addon: Path, upstream: str, workdir: Path) -> list[str]:
    config = workdir / "seaking.yaml"
    # Only the /models cache moves (the user's own cache stays untouched); retries keep their defaults.
    config.write_text(f"models:\n  cache_file: {json.dumps(str(workdir / 'models.json'))}\n")
    return [MITMDUMP, "-s", str(addon), "--mode", f"reverse:{upstream}", *LISTEN,
            "--set", f"seaking_config={config}"]


def litellm_way(python: Path) -> Way:
    """The LiteLLM proxy in its own venv, whose python is `python` (see litellm_way.py)."""
    return Way("litellm", functools.partial(litellm_way_module.command, python), ready=litellm_way_module.READY,
               env=litellm_way_module.environment(), start_timeout=litellm_way_module.START_TIMEOUT,
               health="/health/liveliness")


def all_ways(addon: Path, litellm_python: Path) -> list[Way]:
    return [
        Way("direct"),
        Way("mitmdump", lambda upstream, _: [MITMDUMP, "--mode", f"reverse:{upstream}", *LISTEN]),
        Way("mitmdump-stream",
            lambda upstream, _: [MITMDUMP, "--mode", f"reverse:{upstream}", *LISTEN, "--set", "stream_large_bodies=1"]),
        Way("seaking-proxy", functools.partial(seaking_command, addon)),
        litellm_way(litellm_python),
    ]


WAY_NAMES = [w.name for w in all_ways(Path("addon.py"), Path("python"))]
BASELINES = ("direct", "mitmdump")  # ratios are given against these ...
COMPARISONS = (("seaking-proxy", "litellm"),)  # ... and these pairs too


# --- how much to measure -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    requests: int  # at most this many measured requests (or streams) in a run ...
    seconds: float  # ... started within this many seconds; those in flight then still finish


@dataclass(frozen=True)
class Plan:
    chat: dict[int, Budget]
    stream: dict[int, Budget]
    faults: Budget
    # A way whose streams all fail may take its whole retry schedule per stream; the quick run does not wait for the
    # larger stream runs to repeat the failure.
    skip_streams_after_total_failure: bool = False


FULL = Plan(
    chat={1: Budget(2000, 4), 16: Budget(20000, 6)},
    stream={1: Budget(8, 10), 16: Budget(64, 10), 100: Budget(300, 10)},
    faults=Budget(1200, 15),
)
QUICK = Plan(
    chat={1: Budget(300, 1), 16: Budget(2000, 1.5)},
    stream={1: Budget(2, 5), 16: Budget(16, 5), 100: Budget(100, 5)},
    faults=Budget(200, 2),
    skip_streams_after_total_failure=True,
)


# --- processes ---------------------------------------------------------------------------------------------------


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
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
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


@contextlib.asynccontextmanager
async def reach(way: Way, target: str, workdir: Path, label: str) -> AsyncIterator[tuple[str, Process | None]]:
    """The base URL through which `way` reaches the upstream at `target`, and the proxy process if there is one."""
    if way.command is None:
        yield target, None
        return
    process, port = await start(f"{way.name}-{label}", way.command(target, workdir), workdir, way.ready, way.env,
                                way.start_timeout, way.health)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.stop()


# --- memory ------------------------------------------------------------------------------------------------------


def status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0), so it shows this run's peak, not start-up's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def peak_rss(pid: int, into: dict) -> AsyncIterator[None]:
    """Puts the process's peak resident memory during the block, in MiB, into into["peak_rss_mib"]."""
    exact = reset_peak_rss(pid)
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(status_kib(pid, "VmRSS") or 0)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        yield
    finally:
        sampler.cancel()
        peak = status_kib(pid, "VmHWM") if exact else None
        into["peak_rss_mib"] = round((peak or max(samples, default=0)) / 1024, 1)
        into["peak_rss_source"] = "VmHWM" if peak else "sampled VmRSS"


# --- the load generator ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    ok: bool
    latency: float  # seconds, request sent -> body read (or failure)
    ttft: float | None = None  # streams: request sent -> first data line
    gaps: list[float] = field(default_factory=list)  # streams: between successive data lines
    error: str | None = None  # short, to count failures by kind
    detail: str | None = None  # the start of an error answer's body, for the raw results


async def chat(session: aiohttp.ClientSession, base: str) -> Sample:
    started = time.perf_counter()
    try:
        async with session.post(base + CHAT_PATH, data=CHAT_BODY, headers=HEADERS) as response:
            body = await response.read()
            ok = response.status == 200 and b'"choices"' in body
            error = None if ok else f"HTTP {response.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        ok, error, body = False, type(e).__name__, b""
    return Sample(ok, time.perf_counter() - started, error=error, detail=None if ok else excerpt(body))


async def stream(session: aiohttp.ClientSession, base: str) -> Sample:
    started = time.perf_counter()
    arrivals: list[float] = []
    done = False
    error = detail = None
    try:
        async with session.post(base + CHAT_PATH, data=STREAM_BODY, headers=HEADERS) as response:
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
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        error = type(e).__name__
    return Sample(
        ok=error is None,
        latency=time.perf_counter() - started,
        ttft=arrivals[0] - started if arrivals else None,
        gaps=[later - earlier for earlier, later in zip(arrivals, arrivals[1:])],
        error=error,
        detail=detail,
    )


def excerpt(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


@dataclass
class Run:
    samples: list[Sample]
    seconds: float  # wall time of the measured part


async def run_clients(base: str, clients: int, budget: Budget, one: Callable[..., Awaitable[Sample]]) -> Run:
    """`clients` clients, each on its own keep-alive connection, sending `one` request after another."""
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=CLIENT_TIMEOUT) for _ in range(clients)
    ]
    try:
        # Warm-up: connection set-up (client and proxy side) is not what a long-lived SillyTavern session pays.
        await asyncio.gather(*(chat(s, base) for s in sessions))
        samples: list[Sample] = []
        tickets = iter(range(budget.requests))
        started = time.perf_counter()
        stop_at = started + budget.seconds

        async def client(session: aiohttp.ClientSession) -> None:
            while time.perf_counter() < stop_at and next(tickets, None) is not None:
                samples.append(await one(session, base))

        await asyncio.gather(*(client(s) for s in sessions))
        return Run(samples, time.perf_counter() - started)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


# --- summaries ---------------------------------------------------------------------------------------------------


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


def summarise_chat(run: Run) -> dict:
    ok = [s.latency for s in run.samples if s.ok]
    return {
        "requests": len(run.samples), "failed": len(run.samples) - len(ok), "errors": errors_of(run),
        "seconds": round(run.seconds, 3), "rps": round(len(ok) / run.seconds, 1) if run.seconds else None,
        "p50_ms": ms(percentile(ok, 50)), "p99_ms": ms(percentile(ok, 99)),
    }


def summarise_stream(run: Run) -> dict:
    ttfts = [s.ttft for s in run.samples if s.ok and s.ttft is not None]
    gaps = [g for s in run.samples if s.ok for g in s.gaps]
    ok = len(ttfts)
    return {
        "streams": len(run.samples), "failed": len(run.samples) - ok, "errors": errors_of(run),
        "seconds": round(run.seconds, 3),
        "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "gap_mean_ms": ms(sum(gaps) / len(gaps)) if gaps else None, "gap_p99_ms": ms(percentile(gaps, 99)),
        "duration_p50_ms": ms(percentile([s.latency for s in run.samples if s.ok], 50)),
    }


def summarise_faults(run: Run) -> dict:
    latencies = [s.latency for s in run.samples]
    ok = sum(s.ok for s in run.samples)
    return {
        "requests": len(run.samples), "errors": errors_of(run), "seconds": round(run.seconds, 3),
        "success_pct": round(100 * ok / len(run.samples), 1) if run.samples else None,
        "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
    }


def add_ttft_overheads(results: dict[str, dict]) -> None:
    """TTFT overhead is relative to direct, so it is computed once every way has run."""
    direct = results.get("direct", {})
    for measured in results.values():
        for key, summary in measured.items():
            base = direct.get(key)
            if not key.startswith("stream_") or not base:
                continue
            for q in ("p50", "p99"):
                mine, theirs = summary.get(f"ttft_{q}_ms"), base.get(f"ttft_{q}_ms")
                summary[f"ttft_overhead_{q}_ms"] = None if mine is None or theirs is None else round(mine - theirs, 2)


# --- one way, all runs -------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure_way(way: Way, clean: str, plan: Plan, workdir: Path) -> dict:
    results: dict = {}
    async with reach(way, clean, workdir, "clean") as (base, proxy):
        if proxy:
            await asyncio.sleep(0.5)  # let start-up settle before reading idle memory
            results["memory"] = {"idle_rss_mib": round((status_kib(proxy.pid, "VmRSS") or 0) / 1024, 1)}
            results["startup"] = {"seconds": round(proxy.start_seconds, 2)}
        for clients, budget in plan.chat.items():
            progress(f"  {way.name}: chat, {clients} client(s)")
            results[f"chat_{clients}"] = summarise_chat(await run_clients(base, clients, budget, chat))
        for clients, budget in plan.stream.items():
            progress(f"  {way.name}: stream, {clients} stream(s)")
            watch = peak_rss(proxy.pid, results["memory"]) if proxy and clients == max(plan.stream) else None
            async with watch or contextlib.nullcontext():
                run = await run_clients(base, clients, budget, stream)
            summary = results[f"stream_{clients}"] = summarise_stream(run)
            if plan.skip_streams_after_total_failure and summary["failed"] == summary["streams"]:
                progress(f"  {way.name}: every stream failed; skipping the larger stream runs (--quick)")
                break
        if proxy:
            proxy.check_alive()  # figures from a proxy that died half-way would only measure refused connections
    # A fresh flaky upstream per way: its seeded faults then come in the same order for every way.
    async with upstream(FAIL_RATE, workdir, f"flaky-{way.name}") as flaky:
        async with reach(way, flaky, workdir, "flaky") as (base, _):
            progress(f"  {way.name}: {FAIL_RATE:.0%} 503, {FAULT_CONCURRENCY} clients")
            results["faults"] = summarise_faults(await run_clients(base, FAULT_CONCURRENCY, plan.faults, chat))
    return results


async def bench(ways: list[Way], plan: Plan, workdir: Path, skipped: dict[str, str]) -> dict[str, dict]:
    """Every way's results; a way in `skipped` (name -> why) gets {"skipped": why} instead."""
    results: dict[str, dict] = {}
    async with upstream(0.0, workdir, "clean") as clean:
        for way in ways:
            if way.name in skipped:
                progress(f"{way.name}: skipped: {skipped[way.name]}")
                results[way.name] = {"skipped": skipped[way.name]}
                continue
            progress(f"{way.name} ...")
            try:
                results[way.name] = await measure_way(way, clean, plan, workdir)
            except Exception as e:  # one broken way (the addon is being edited) must not cost the others' figures
                progress(f"  {way.name} failed: {e}")
                results[way.name] = {"broken": f"{type(e).__name__}: {e}"}
    add_ttft_overheads(results)
    return results


# --- the report --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    label: str
    run: str  # key in a way's results
    key: str  # key in that run's summary
    unit: str


def figures(plan: Plan) -> list[Figure]:
    rows: list[Figure] = []
    for n in plan.chat:
        rows += [Figure(f"chat, {n} client{'s' * (n > 1)}: throughput", f"chat_{n}", "rps", "req/s"),
                 Figure(f"chat, {n} client{'s' * (n > 1)}: latency p50", f"chat_{n}", "p50_ms", "ms"),
                 Figure(f"chat, {n} client{'s' * (n > 1)}: latency p99", f"chat_{n}", "p99_ms", "ms")]
    for n in plan.stream:
        name = f"stream, {n} stream{'s' * (n > 1)}"
        rows += [Figure(f"{name}: TTFT p50", f"stream_{n}", "ttft_p50_ms", "ms"),
                 Figure(f"{name}: TTFT p99", f"stream_{n}", "ttft_p99_ms", "ms"),
                 Figure(f"{name}: TTFT overhead p50", f"stream_{n}", "ttft_overhead_p50_ms", "ms"),
                 Figure(f"{name}: TTFT overhead p99", f"stream_{n}", "ttft_overhead_p99_ms", "ms"),
                 Figure(f"{name}: chunk gap mean", f"stream_{n}", "gap_mean_ms", "ms"),
                 Figure(f"{name}: chunk gap p99", f"stream_{n}", "gap_p99_ms", "ms")]
    rows += [Figure("failed (clean upstream)", "clean", "failed", "count"),
             Figure("proxy start-up, until it serves", "startup", "seconds", "s"),
             Figure("proxy RSS, idle", "memory", "idle_rss_mib", "MiB"),
             Figure(f"proxy RSS, peak during {max(plan.stream)} streams", "memory", "peak_rss_mib", "MiB"),
             Figure(f"{FAIL_RATE:.0%} 503: success", "faults", "success_pct", "%"),
             Figure(f"{FAIL_RATE:.0%} 503: latency p50", "faults", "p50_ms", "ms"),
             Figure(f"{FAIL_RATE:.0%} 503: latency p99", "faults", "p99_ms", "ms")]
    return rows


def value(results: dict, way: str, figure: Figure) -> float | None:
    measured = results.get(way, {})
    if figure.run == "clean":  # failures over every clean-upstream run together
        runs = [s for k, s in measured.items() if k.startswith(("chat_", "stream_"))]
        return sum(s["failed"] for s in runs) if runs else None
    return (measured.get(figure.run) or {}).get(figure.key)


def fmt(number: float | None) -> str:
    if number is None:
        return "—"
    if abs(number) >= 100 or number == int(number):
        return f"{number:,.0f}"
    return f"{number:.1f}" if abs(number) >= 10 else f"{number:.2f}"


def ratio(mine: float | None, base: float | None) -> str:
    if mine is None or base is None or base == 0:
        return "—"
    quotient = mine / base
    return f"{quotient:,.0f}" if quotient >= 100 else f"{quotient:.2f}"


def ratio_pairs(ways: list[str]) -> list[tuple[str, str]]:
    pairs = [(w, b) for b in BASELINES if b in ways for w in ways if ways.index(w) > ways.index(b)]
    return pairs + [(w, b) for w, b in COMPARISONS if w in ways and b in ways]


def markdown_tables(results: dict, ways: list[str], plan: Plan) -> str:
    rows = figures(plan)
    pairs = ratio_pairs(ways)
    lines = ["| figure | unit | " + " | ".join(ways) + " |", "|---|---|" + "---:|" * len(ways)]
    for f in rows:
        lines.append(f"| {f.label} | {f.unit} | " + " | ".join(fmt(value(results, w, f)) for w in ways) + " |")
    lines += ["", "Ratios (this way's figure ÷ the baseline's):", ""]
    lines.append("| figure | " + " | ".join(f"{w} ÷ {b}" for w, b in pairs) + " |")
    lines.append("|---|" + "---:|" * len(pairs))
    for f in rows:
        cells = [ratio(value(results, w, f), value(results, b, f)) for w, b in pairs]
        lines.append(f"| {f.label} | " + " | ".join(cells) + " |")
    for w in ways:
        if "broken" in results.get(w, {}):
            lines += ["", f"**{w}** could not be measured:", "", "```text", results[w]["broken"], "```"]
        if "skipped" in results.get(w, {}):
            lines += ["", f"**{w}** was skipped:", "", "```text", results[w]["skipped"], "```"]
    return "\n".join(lines)


# --- the summary at the top: the same few comparisons every run, worded from this run's figures ---------------------


def summary(results: dict, ways: list[str], plan: Plan) -> list[str]:
    """A few plain lines comparing seaking-proxy with plain mitmdump(-stream) and LiteLLM, losses included."""
    sp = "seaking-proxy"
    if sp not in ways or not any(k.startswith("chat_") for k in results.get(sp, {})):
        return []

    def get(way: str, run: str, key: str) -> float | None:
        return value(results, way, Figure("", run, key, "")) if way in ways else None

    names = {"mitmdump": "plain mitmdump", "mitmdump-stream": "mitmdump-stream", "litellm": "LiteLLM"}
    others = {w: label for w, label in names.items() if get(w, f"chat_{min(plan.chat)}", "p50_ms") is not None}
    streamers = {w: label for w, label in others.items() if w != "mitmdump"}

    def listing(run: str, key: str, who: dict[str, str], unit: str = "") -> str:
        """"plain mitmdump 2.69, LiteLLM 7.85" for the ways measured."""
        return ", ".join(f"{label} {fmt(get(w, run, key))}{unit}" for w, label in who.items()
                         if get(w, run, key) is not None)

    def compared(mine: float | None, theirs: float | None) -> str:
        if mine is None or not theirs:
            return "?"
        quotient = mine / theirs
        return "about the same as" if 0.9 <= quotient <= 1.1 else "more than" if quotient > 1.1 else "less than"

    big, small = max(plan.chat), min(plan.chat)
    rps = get(sp, f"chat_{big}", "rps")
    mitm = get("mitmdump", f"chat_{big}", "rps")
    lines = [(
        f"- **Non-streaming:** at {big} clients seaking-proxy answers {fmt(rps)} req/s, {compared(rps, mitm)} plain "
        f"mitmdump ({listing(f'chat_{big}', 'rps', others)}; direct {fmt(get('direct', f'chat_{big}', 'rps'))}). "
        f"A lone request's p50: {fmt(get(sp, f'chat_{small}', 'p50_ms'))} ms "
        f"({listing(f'chat_{small}', 'p50_ms', others)})."
    )]
    ns = list(plan.stream)
    across = "/".join(map(str, ns))

    def overheads(way: str) -> str:
        return "/".join(fmt(get(way, f"stream_{n}", "ttft_overhead_p50_ms")) for n in ns)

    buffered = get("mitmdump", f"stream_{ns[0]}", "ttft_p50_ms")
    lines.append(
        "- **Streaming:** " + (f"plain mitmdump buffers whole streams (first token after {fmt(buffered)} ms). "
                               if buffered else "")
        + f"seaking-proxy streams, adding {overheads(sp)} ms p50 to the first token at {across} streams ("
        + ", ".join(f"{label} {overheads(w)}" for w, label in streamers.items()) + "); "
        f"chunk gap p99 at {ns[-1]} streams {fmt(get(sp, f'stream_{ns[-1]}', 'gap_p99_ms'))} ms ("
        + listing(f"stream_{ns[-1]}", "gap_p99_ms", {**streamers, "direct": "direct"})
        + f"; the upstream sends every {CHUNK_DELAY * 1000:.0f} ms).")
    lines.append(
        f"- **Memory, start-up:** peak RSS during {ns[-1]} streams {fmt(get(sp, 'memory', 'peak_rss_mib'))} MiB ("
        + listing("memory", "peak_rss_mib", others) + f"); serving {fmt(get(sp, 'startup', 'seconds'))} s after "
        "start (" + listing("startup", "seconds", others, " s") + ").")
    fault = f"{FAIL_RATE:.0%} of attempts answered 503"
    line = (f"- **{fault}:** seaking-proxy delivers {fmt(get(sp, 'faults', 'success_pct'))} % ("
            + listing("faults", "success_pct", {"direct": "direct", **others}, " %")
            + f"); p99 {fmt(get(sp, 'faults', 'p99_ms'))} ms, which is retry back-off ("
            + listing("faults", "p99_ms", {w: label for w, label in others.items() if w == "litellm"}, " ms")
            + ").").replace(" ()", "")
    example = str((results.get(sp, {}).get("faults") or {}).get("errors", {}).get("example", ""))
    if "budget" in example:
        line += (" Its failures come from its default retry budget: with retries past their share of the requests, "
                 "it answers the 503 at once instead of retrying.")
    lines.append(line)
    losses = where_it_loses(results, ways, plan)
    if losses:
        lines.append("- **Where seaking-proxy loses** (by over 10 %): " + "; ".join(losses) + ".")
    missing = [w for w in ways if results.get(w, {}).keys() & {"skipped", "broken"}]
    lines.append("- One run on a shared 2-core machine: compare ways within this run; small differences are noise."
                 + (f" Not measured: {', '.join(missing)} (see below)." if missing else ""))
    return lines


def where_it_loses(results: dict, ways: list[str], plan: Plan, worst: int = 6) -> list[str]:
    """The figures where seaking-proxy does worse than another proxy by more than 10 %, worst first (per figure,
    only its worst comparison)."""
    sp = "seaking-proxy"
    fault = f"{FAIL_RATE:.0%} 503"
    keys = [Figure(f"req/s at {n} client{'s' * (n > 1)}", f"chat_{n}", "rps", "req/s") for n in plan.chat]
    keys += [Figure(f"latency p50 at {n} client{'s' * (n > 1)}", f"chat_{n}", "p50_ms", "ms") for n in plan.chat]
    keys += [Figure(f"TTFT overhead p50 at {n} stream{'s' * (n > 1)}", f"stream_{n}", "ttft_overhead_p50_ms", "ms")
             for n in plan.stream]
    keys += [Figure(f"chunk gap p99 at {n} stream{'s' * (n > 1)}", f"stream_{n}", "gap_p99_ms", "ms")
             for n in plan.stream]
    keys += [Figure("peak RSS", "memory", "peak_rss_mib", "MiB"), Figure("start-up", "startup", "seconds", "s"),
             Figure(f"success under {fault}", "faults", "success_pct", "%"),
             Figure(f"p50 under {fault}", "faults", "p50_ms", "ms"),
             Figure(f"p99 under {fault}", "faults", "p99_ms", "ms")]
    higher_is_better = {"rps", "success_pct"}
    worst_per_figure: dict[str, tuple[bool, float, str]] = {}
    for other in ("mitmdump", "mitmdump-stream", "litellm"):
        if other not in ways:
            continue
        for f in keys:
            mine, theirs = value(results, sp, f), value(results, other, f)
            if mine is None or theirs is None or theirs <= 0 or mine <= 0:
                continue
            if other.startswith("mitmdump") and f.run == "faults" and f.key != "success_pct":
                continue  # a way that never retries answers a fault at once: its latency is no race
            if other == "mitmdump" and f.run.startswith("stream_"):
                continue  # plain mitmdump does not stream: its TTFT and gaps are no race
            if f.run.startswith("stream_") and abs(mine - theirs) < 2:
                continue  # a millisecond or two of streaming is noise
            how_much = theirs / mine if f.key in higher_is_better else mine / theirs
            text = f"{f.label}, vs {names_for_people.get(other, other)} ({fmt(mine)} vs {fmt(theirs)} {f.unit})"
            if how_much > 1.1 and how_much > worst_per_figure.get(f.label, (False, 0.0, ""))[1]:
                # Delivering fewer answers is what a reliability proxy exists to avoid: that loss comes first.
                worst_per_figure[f.label] = (f.key == "success_pct", how_much, text)
    found = sorted(worst_per_figure.values(), reverse=True)
    return [text for *_, text in found[:worst]]


names_for_people = {"mitmdump": "plain mitmdump", "litellm": "LiteLLM"}


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(quick: bool, litellm: dict) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews every figure; a load near 0 before the run means a quiet machine.
        "load_average_before": round(os.getloadavg()[0], 2),
        "revision": git_revision(),
        "mode": "quick" if quick else "full",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mitmproxy": importlib.metadata.version("mitmproxy"),
        "aiohttp": aiohttp.__version__,
        "litellm": litellm,
        "upstream": {"stream_chunks": STREAM_CHUNKS, "chunk_delay_s": CHUNK_DELAY, "fail_rate": FAIL_RATE},
    }


def raw_results(results: dict, ways: list[str], plan: Plan, env: dict, seconds: float) -> dict:
    return {"environment": env, "plan": asdict(plan), "ways": ways, "results": results,
            "run_seconds": round(seconds, 1)}


def report(results: dict, ways: list[str], plan: Plan, env: dict, seconds: float,
           plot_note: str) -> tuple[str, str]:
    """(table for the terminal, whole markdown document). plot_note: the markdown for the plot, or why there is none."""
    tables = markdown_tables(results, ways, plan)
    legend = __doc__.split("What the figures mean:\n", 1)[1]
    raw = raw_results(results, ways, plan, env, seconds)
    summary_lines = summary(results, ways, plan)
    litellm = env.get("litellm") or {}
    versions = f"Python {env['python']}, mitmproxy {env['mitmproxy']}" + (
        f", LiteLLM {litellm['version']}" if litellm.get("version") else "")
    document = "\n".join([
        "# seaking-proxy benchmark",
        "",
        *summary_lines, *([""] if summary_lines else []),
        (f"{env['date']}, revision {env['revision']}, {env['mode']} run ({seconds:.0f} s), {env['cpus']} CPUs "
         f"(load average before: {env['load_average_before']}, after: {env.get('load_average_after', '?')}), "
         f"{versions}."),
        "Produced by `benchmarks/bench.py`" + (" --quick" if env["mode"] == "quick" else "") + "; setup and method in "
        "its docstring. Upstream, proxy and load generator are separate processes on loopback.",
        "",
        plot_note,
        "",
        tables,
        "",
        "## What the figures mean",
        "",
        "```text",
        legend.rstrip(),
        "```",
        "",
        "## Raw results",
        "",
        "```json",
        json.dumps(raw, indent=2),
        "```",
        "",
    ])
    return tables, document


# --- command line ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: the whole run takes under a minute")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark.md"), help="markdown report to write")
    parser.add_argument("--ways", default=",".join(WAY_NAMES),
                        help="comma-separated subset of: " + ", ".join(WAY_NAMES))
    parser.add_argument("--addon", default=str(REPO / "addon.py"), help="seaking-proxy's addon.py (e.g. of another "
                        "checkout); default: this repository's")
    args = parser.parse_args()
    wanted = args.ways.split(",")
    unknown = set(wanted) - set(WAY_NAMES)
    if unknown:
        parser.error(f"unknown way(s): {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with `&` from a script, SIGINT is ignored, and children would inherit that: SIGINT could not stop
        # them. Any handler here is reset to the default in a child.
        signal.signal(signal.SIGINT, signal.default_int_handler)

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
    ways = [w for w in all_ways(Path(args.addon).resolve(), litellm_python) if w.name in wanted]

    env = environment(args.quick, litellm)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seaking-bench-") as workdir:
        results = asyncio.run(bench(ways, plan, Path(workdir), skipped))
    seconds = time.monotonic() - started
    # The run's own processes load the machine too; an "after" far above what the run itself leaves (~1-2 on two
    # cores) means something else was running meanwhile.
    env["load_average_after"] = round(os.getloadavg()[0], 2)

    names = [w.name for w in ways]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_note = draw_plot(raw_results(results, names, plan, env, seconds), png, litellm_python)
    tables, document = report(results, names, plan, env, seconds, plot_note)
    print(tables)
    out.write_text(document)
    progress(f"\nwritten to {out} ({seconds:.0f} s); {plot_note}")


def draw_plot(raw: dict, png: Path, litellm_python: Path) -> str:
    """Draws benchmarks/plot.py's PNG with whichever python has matplotlib: this one, or the LiteLLM venv's. The
    markdown that shows it, or a note saying why there is none (an old PNG is then removed: it would mislead)."""
    if importlib.util.find_spec("matplotlib") is not None:
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
    return f"![The main figures, one bar per way]({png.name})"


if __name__ == "__main__":
    main()
