"""The benchmark's processes: each one started with its output to a log file, in a process group of its own, and
ready once its log says it listens (the lab harness's "listening at" line); the upstream; the ways of reaching it
(direct, plain mitmdump, the floor, seaking-proxy alone and behind HAProxy, LiteLLM); their resident memory and open
files watched during a run, and the open-files limit they inherit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from benchmarks import litellm_way as litellm_way_module
from benchmarks.scenarios import CHUNK_DELAY, STREAM_CHUNKS
from seaking.lab.haproxy import haproxy_config  # docs/haproxy.cfg, the setup of docs/running.md
from seaking.lab.harness import LISTENING, executable, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent  # run with the project's venv python: its mitmdump is next to it
MITMDUMP = executable("mitmdump")
T = TypeVar("T")
LISTEN = ["--listen-host", "127.0.0.1", "--listen-port", "0"]


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
        """The port it listens on, once it says so (`ready`'s group "port"; and `health` answers 200 there). Sets
    start_seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ready.search(self.log_path.read_text(errors="replace"))
            if found:
                port = int(found.group("port"))
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


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGTERM (`timeout`, `kill`, CI) cancelling `main` as Ctrl-C does: its `finally` blocks then
    stop the processes it started, which are in process groups of their own and would outlive it otherwise."""

    async def cancelled_on_sigterm() -> T:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await main

    return asyncio.run(cancelled_on_sigterm())


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
    """A fresh bench_upstream.py process (run as a module from the project's root); its URL."""
    argv = [sys.executable, "-m", "benchmarks.bench_upstream", "--chunks", str(STREAM_CHUNKS),
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


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
