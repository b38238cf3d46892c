"""Where a request's cost goes inside the proxy process: CPU time, event-loop wake-ups and system calls per request,
and (with py-spy) which part of the code the CPU time is spent in. Plain mitmdump(-stream) beside seaking-proxy.

    .venv/bin/python -m benchmarks.profile [--kind chat|stream] [--requests 2000] [--concurrency 1]
                                           [--ways mitmdump,mitmdump-stream,seaking-proxy] [--py-spy [--top] [--keep DIR]]
                                           [--strace]

Per way: one proxy process in front of benchmarks/bench_upstream.py; after a warm-up, `requests` requests (chat:
non-streaming; stream: 20 chunks 50 ms apart) from `concurrency` clients. The figures come from the proxy process
itself, so they hardly depend on what else the machine does:
  CPU ms / request ........ utime + stime of the process (/proc/PID/stat) over the run, per request
  wake-ups / request ...... voluntary context switches (/proc/PID/status): each is the event loop going to sleep in
                            epoll_wait and being woken again
  syscalls / request ...... with --strace (strace -c -f on the process): every system call, by name
  where the CPU goes ...... with --py-spy (py-spy record, native off, 1,000 Hz): each sample is given to the innermost
                            frame of a known part (this addon, aiohttp client/server, mitmproxy's layers, its addon
                            hook dispatch, json, logging, the asyncio loop, ...), as a share of the samples.
Measure, not test: nothing is asserted. Both tools are optional (pip install py-spy; apt-get install strace).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.processes import BIN, REPO, Way, all_ways, raise_open_files_limit, run, status_kib, upstream
from benchmarks.report import progress
from benchmarks.scenarios import CLIENT_TIMEOUT, chat, chat_body, stream

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Innermost match wins: a sample in json.loads called from the guard counts as json.
PARTS = [  # matched against py-spy's frames, "function (path/file.py:line)"
    ("seaking-proxy: its own code", re.compile(r"[(/]seaking/|[(/]retry_policy\.py|[(/]addon\.py:")),
    ("tenacity", re.compile(r"[(/]tenacity/")),
    ("aiohttp server (the relay)", re.compile(r"[(/]aiohttp/web")),
    ("aiohttp client (the exchange)", re.compile(r"[(/]aiohttp/")),
    ("mitmproxy: hook dispatch", re.compile(r"[(/]mitmproxy/(addonmanager|hooks|eventsequence)")),
    ("mitmproxy: addons of its own", re.compile(r"[(/]mitmproxy/addons/")),
    ("mitmproxy: proxy layers", re.compile(r"[(/]mitmproxy/proxy/")),
    ("mitmproxy: flows, headers, other", re.compile(r"[(/]mitmproxy/")),
    ("json", re.compile(r"[(/]json/")),
    ("logging", re.compile(r"[(/]logging/")),
    ("asyncio event loop", re.compile(r"[(/]asyncio/")),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def wakeups(pid: int) -> int:
    return status_kib(pid, "voluntary_ctxt_switches") or 0


async def drive(base: str, kind: str, requests: int, concurrency: int) -> int:
    """`requests` requests from `concurrency` clients; the number that succeeded."""
    streaming = kind == "stream"
    body = chat_body(streaming)
    one = stream if streaming else chat
    tickets = iter(range(requests))
    ok = 0

    async def client() -> None:
        nonlocal ok
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=CLIENT_TIMEOUT) as s:
            await chat(s, base, chat_body(False))  # warm-up: a connection, as a long-lived client has
            while next(tickets, None) is not None:
                ok += (await one(s, base, body)).ok

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return "other (interpreter, C code)"


def read_py_spy(path: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit() and "epoll" not in stack.rsplit(";", 1)[-1]:
            counts[part_of(stack)] += int(count)
    total = sum(counts.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in counts.most_common()}


def top_functions(path: Path, count: int = 25) -> list[tuple[str, float]]:
    """The functions that are on the stack in the most samples (inclusive time), outside the event loop's own."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        total += int(samples)
        for frame in set(stack.split(";")):
            if not re.search(r"\((asyncio|mitmproxy/tools|mitmdump)[/:]|^<module>|^process ", frame):
                inclusive[frame] += int(samples)
    return [(frame, round(100 * n / max(total, 1), 1)) for frame, n in inclusive.most_common(count)]


def read_strace(path: Path) -> dict[str, int]:
    calls = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


async def profile_way(way: Way, upstream_url: str, args: argparse.Namespace, workdir: Path) -> dict:
    async with way.start(upstream_url, workdir, way.name) as reached:
        pid = reached.processes[0].pid
        await drive(reached.base, args.kind, min(200, args.requests), args.concurrency)  # warm-up
        # First a run with nothing attached: tracing and sampling slow the process down and wake it up.
        cpu_before, wake_before = cpu_seconds(pid), wakeups(pid)
        started = time.perf_counter()
        ok = await drive(reached.base, args.kind, args.requests, args.concurrency)
        seconds = time.perf_counter() - started
        cpu, woken = cpu_seconds(pid) - cpu_before, wakeups(pid) - wake_before
        result = {"requests": args.requests, "ok": ok, "seconds": round(seconds, 2),
                  "cpu_ms_per_request": round(1000 * cpu / args.requests, 3),
                  "wakeups_per_request": round(woken / args.requests, 2)}
        spy_out, strace_out = workdir / f"{way.name}.pyspy", workdir / f"{way.name}.strace"
        py_spy = [shutil.which("py-spy") or str(BIN / "py-spy"), "record", "-r", "1000", "-f", "raw", "-o",
                  str(spy_out), "-p", str(pid)]
        strace = ["strace", "-c", "-f", "-o", str(strace_out), "-p", str(pid)]
        # One at a time: both attach with ptrace.
        for wanted, argv in ((args.py_spy, py_spy), (args.strace, strace)):
            if wanted:
                tool = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # let it attach
                await drive(reached.base, args.kind, args.requests, args.concurrency)
                tool.send_signal(signal.SIGINT)
                tool.wait(60)
        if args.py_spy and spy_out.exists():
            if args.keep:
                shutil.copy(spy_out, Path(args.keep) / spy_out.name)
            result["where"] = read_py_spy(spy_out)
            result["top"] = top_functions(spy_out)
        if args.strace and strace_out.exists():
            calls = read_strace(strace_out)
            result["syscalls_per_request"] = round(sum(calls.values()) / args.requests, 1)
            result["syscalls"] = {k: round(v / args.requests, 2) for k, v in
                                  sorted(calls.items(), key=lambda kv: -kv[1])[:8]}
        return result


async def main_async(args: argparse.Namespace) -> dict:
    ways = {w.name: w for w in all_ways(Path(args.addon).resolve(), Path("python"))}
    results = {}
    with tempfile.TemporaryDirectory(prefix="seaking-profile-") as tmp:
        workdir = Path(tmp)
        async with upstream(0.0, workdir, "clean") as upstream_url:
            for name in args.ways.split(","):
                progress(f"{name} ...")
                results[name] = await profile_way(ways[name], upstream_url, args, workdir)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("chat", "stream"), default="chat")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--ways", default="mitmdump,mitmdump-stream,seaking-proxy")
    parser.add_argument("--addon", default=str(REPO / "addon.py"))
    parser.add_argument("--py-spy", action="store_true", help="where the CPU goes (needs py-spy)")
    parser.add_argument("--strace", action="store_true", help="system calls by name (needs strace)")
    parser.add_argument("--top", action="store_true", help="with --py-spy: the functions with the most samples")
    parser.add_argument("--keep", metavar="DIR", help="with --py-spy: keep its raw samples there (WAY.pyspy)")
    args = parser.parse_args()
    raise_open_files_limit()
    results = run(main_async(args))
    print(f"\n{args.kind}, {args.requests} requests from {args.concurrency} client(s); load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| way | CPU ms / request | wake-ups / request | syscalls / request |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['cpu_ms_per_request']} | {r['wakeups_per_request']} | "
              f"{r.get('syscalls_per_request', '—')} |")
    for name, r in results.items():
        if "syscalls" in r:
            print(f"\n{name}, system calls per request: " + ", ".join(f"{k} {v}" for k, v in r["syscalls"].items()))
        if "where" in r:
            print(f"\n{name}, where the CPU goes (% of samples):")
            for part, share in r["where"].items():
                print(f"  {share:5.1f}  {part}")
            if args.top:
                print(f"\n{name}, functions on the stack in the most samples (%):")
                for frame, share in r["top"]:
                    print(f"  {share:5.1f}  {frame}")


if __name__ == "__main__":
    sys.exit(main())
