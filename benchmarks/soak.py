"""Chaos soak: the proxy under every fault the fault upstream knows, for minutes, and whether anything else happens.

    python -m benchmarks.soak [--minutes 30] [--streams 200] [--seed 1] [--out docs/soak.md] [--workdir DIR]
                              [--proxy-arg=ARG ...]

Not part of the tests (it runs for minutes by design). What runs, all on 127.0.0.1:

  upstreams .. two benchmarks/soak_upstream.py processes (FaultyUpstreams), each a target of the proxy (`targets:`,
               round robin), `prefill: assistant` on both, so OpenAI-shape replies can be continued as Claude's are
  the proxy .. `mitmdump -s addon.py` (the lab harness's Mitmdump), its output to a log file, every line scanned
  clients .... `--streams` loops, each sending one streaming request after another (a pause of 0.2-1 s between):
               three in four OpenAI chat (SillyTavern's Custom source), one in four Anthropic Messages (its Claude
               source). Each request's case id picks its recipe (soak_upstream.recipe): a fault from the whole
               catalogue (statuses, Retry-After, resets, hangs, slow headers, empty, malformed and error bodies, blank
               replies, error events first or mid-stream, drops, stalls, early ends, restated seams, refused
               prefills, tool calls, usage chunks, late first events, thinking with and without pings), the reply's
               20-60 words at 10-40 ms a word; and one request in ten leaves at a random point
  chaos ...... every minute: at 0:20 one upstream (in turn) is killed with SIGKILL and at 0:24 started again on the same
               port; at 0:45 the config file is rewritten (models.fallback toggled) and the proxy reloads it
  samples .... every 2 s the proxy's resident memory (VmRSS), open files (/proc/PID/fd) and threads

--workdir keeps the proxy's log, each upstream's log (a line per request of a case: which of its requests, what it
answered) and, in else/, the raw stream of each request that came to anything else (the first 100). --proxy-arg passes
more arguments to mitmdump (a probe of your own: --proxy-arg=-s --proxy-arg=probe.py).

The proxy's timings are short so that a minute holds many faults: target_proxy.timeout and
streaming.first_event_timeout 2 s (past them, attempts are hedged), idle_timeout 2 s, heartbeat_interval 3 s,
error_handling.deadline 20 s, resume_attempts 2; the retry budget is raised (100 %) so that retries, hedges and
continuations are what the soak exercises, rather than the budget's refusals.

Each request comes to one of:

  whole ......... exactly the reply's text (or tool call arguments), the stream's own end ([DONE]; message_stop), no
                  error event
  clean error ... a status >= 400 with a JSON error in the client's dialect, or a 200 stream whose text so far is a
                  start of the reply, ended by exactly one error event (in the dialect) and the stream's end
  left .......... the client left on purpose (what it had read by then was a start of the reply)
  anything else . with its reason: a hang (no end within (1 + resume_attempts) x (deadline + idle_timeout) + 15 s, the
                  longest a request can take by the config), a doubled or missing piece, a non-JSON error, a second
                  error event, no end, a broken body, data after the end, ...

The report (markdown, JSON beside it, and a PNG when a Python with matplotlib is found: SEAKING_PLOT_PYTHON, this
one, or the benchmark's LiteLLM venv) has a row per minute: requests started in it and what they came to, tracebacks
and log errors in the proxy's output (Traceback, "Error handling request", asyncio's "exception was never retrieved"
and the like), and the median RSS and open files. It passes when nothing is in "anything else", the log has no
traceback or error of that kind, and the last minute's RSS and open files are within 10 % of the second minute's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import aiohttp
import yaml

from benchmarks import litellm_way
from benchmarks.processes import Process, open_files, raise_open_files_limit, run, status_kib
from benchmarks.report import git_revision, load_average
from benchmarks.stats import percentile
from benchmarks.soak_upstream import ANTHROPIC, OPENAI, Recipe, recipe
from seaking.lab.harness import Mitmdump, free_ports

REPO = Path(__file__).resolve().parent.parent
MINUTE = 60.0
KILL_AT, RESTART_AFTER, RELOAD_AT = 20.0, 4.0, 45.0  # seconds into each minute
SAMPLE_EVERY = 2.0
PAUSE = (0.2, 1.0)  # seconds a client waits between two of its requests
FLAT = 0.10  # the last minute's RSS and open files within this share of the second minute's
HANG_MARGIN = 15.0

CONFIG = {
    "target_proxy": {"timeout": 2, "prefill": "assistant"},
    "error_handling": {"deadline": 20, "base_delay": 0.25, "max_delay": 2, "max_retries": 4},
    "streaming": {"first_event_timeout": 2, "idle_timeout": 2, "heartbeat_interval": 3, "resume_attempts": 2},
    "server": {"shutdown_grace": 2},
    "load_balancing": "round_robin",
    "health_check": {"interval": 5},
    "retry_budget": {"percent": 100, "min_per_second": 10},
}

# Lines of the proxy's output that must not be there: a traceback, aiohttp's server failing a request (the relay),
# asyncio's complaints about tasks and callbacks, mitmproxy's addon errors.
LOG_PROBLEMS = re.compile(
    r"Traceback \(most recent call last\)|Error handling request|exception was never retrieved|Exception in callback"
    r"|Task was destroyed but it is pending|Addon error|Unclosed (?:client session|connection|response)"
)
RELOADED = re.compile(r"seaking-proxy config .* loaded:")


def proxy_config(upstreams: list[str], workdir: Path, toggle: bool) -> dict:
    config = json.loads(json.dumps(CONFIG))
    config["target_proxy"]["url"] = upstreams[0]
    config["targets"] = [{"url": url, "prefill": "assistant"} for url in upstreams[1:]]
    config["models"] = {"cache_file": str(workdir / "models.json"), "fallback": ["model-a"] if toggle else []}
    return config


def hang_after(config: dict = CONFIG) -> float:
    """The longest a request can take by the config: the first run and each continuation run within the deadline,
    each after a stall of idle_timeout; plus a margin for the replies themselves and a busy machine."""
    deadline = config["error_handling"]["deadline"]
    idle = config["streaming"]["idle_timeout"]
    return (1 + config["streaming"]["resume_attempts"]) * (deadline + idle) + HANG_MARGIN


# --- the proxy, its output scanned -----------------------------------------------------------------------------------


class WatchedMitmdump(Mitmdump):
    """The harness's Mitmdump, its output written to a log file as it comes (not kept in memory: a soak's output is
    long) and each line scanned for problems and reloads."""

    KEPT = 20_000  # characters of output kept in `output` (start-up's lines, for MitmdumpFailed)

    def __init__(self, *args: str, log_path: Path, clock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log_path = log_path
        self.clock = clock  # seconds since the soak began
        self.problems: list[dict] = []  # {"t", "line", "context"}
        self.reloads: list[float] = []
        self._context: dict | None = None  # the problem whose following lines are being kept
        self._log: TextIO | None = None  # the log file, while the output is read

    async def _read_output(self) -> None:
        with self.log_path.open("w") as self._log:
            await super()._read_output()

    def _line(self, text: str) -> None:
        self._log.write(text)
        self._scan(text.rstrip("\n"))
        if len(self.output) < self.KEPT:  # start-up's lines, where the ports are said, are kept
            super()._line(text)

    def _scan(self, text: str) -> None:
        now = self.clock()
        if LOG_PROBLEMS.search(text):
            self._context = {"t": round(now, 1), "line": text[:300], "context": []}
            self.problems.append(self._context)
        elif self._context is not None and len(self._context["context"]) < 40:
            self._context["context"].append(text[:300])
        if RELOADED.search(text):
            self.reloads.append(round(now, 1))


# --- the upstreams ---------------------------------------------------------------------------------------------------


class Upstreams:
    """Two soak_upstream processes on fixed ports: each can be killed and started again on its port."""

    NAMES = ("A", "B")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = free_ports(len(self.NAMES))
        self.processes: dict[str, Process | None] = dict.fromkeys(self.NAMES)
        self.generation = Counter()

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    async def start(self, name: str) -> float:
        """Start upstream `name` on its port; the seconds until it accepted connections."""
        started = time.monotonic()
        port = self.ports[self.NAMES.index(name)]
        self.generation[name] += 1
        argv = [sys.executable, "-m", "benchmarks.soak_upstream", "--port", str(port), "--name", name, "--trace"]
        process = Process(f"upstream-{name}-{self.generation[name]}", argv, self.workdir)
        self.processes[name] = process
        for _ in range(50):  # the port may still be held for a moment by the killed process's sockets
            try:
                await process.accepting(port, timeout=10)
                return time.monotonic() - started
            except RuntimeError:
                if process.popen.poll() is None:
                    raise
                await asyncio.sleep(0.2)
                process.stop()
                process = Process(f"upstream-{name}-{self.generation[name]}", argv, self.workdir)
                self.processes[name] = process
        raise RuntimeError(f"upstream {name} could not listen on {port} again")

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.popen.wait()
        process.stop()  # the log closed, nothing left of its group
        self.processes[name] = None

    def stop(self) -> None:
        for name, process in self.processes.items():
            if process is not None:
                process.stop()
                self.processes[name] = None


# --- a client's request and how it ended -----------------------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    kind: str
    api: str
    started: float  # seconds since the soak began
    seconds: float
    result: str  # whole, clean, left, else
    reason: str = ""  # for else: what went wrong; for clean: the error's code
    detail: str = ""


class Sse:
    """Server-sent events from lines: (event name, data) each; comments (heartbeats) skipped. The soak's own reader,
    not seaking/sse.py's framer: a checker must not share the code it checks."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.data: list[str] = []
        self.pending = False  # lines of an event not yet ended by a blank line

    def line(self, raw: bytes) -> tuple[str | None, str] | None:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not text:
            if not self.pending:
                return None
            event = (self.name, "\n".join(self.data))
            self.name, self.data, self.pending = None, [], False
            return event
        if text.startswith(":"):
            return None
        self.pending = True
        field_name, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field_name == "event":
            self.name = value
        elif field_name == "data":
            self.data.append(value)
        return None


class Bad(Exception):
    """The stream broke a rule: anything else, with this reason."""


class Reading:
    """What a client has read of a stream so far, judged event by event."""

    def __init__(self, r: Recipe) -> None:
        self.recipe = r
        self.text = ""
        self.arguments = ""
        self.errors: list[dict] = []
        self.ended = False  # [DONE] (OpenAI) or message_stop (Anthropic)
        self.content_events = 0
        self.finishes = self.roles = self.starts = self.deltas = 0
        self.indexes: set = set()
        self.raw = bytearray()  # what was read, kept for a request that comes to anything else

    @property
    def got(self) -> str:
        return self.arguments if self.recipe.tool else self.text

    def event(self, name: str | None, data: str) -> None:
        if self.ended:
            raise Bad("data after the stream's end")
        if self.recipe.api == OPENAI and data == "[DONE]":
            self.ended = True
            return
        if self.errors:
            raise Bad("an event after the error event")
        try:
            document = json.loads(data)
        except ValueError:
            raise Bad("a non-JSON event") from None
        if not isinstance(document, dict):
            raise Bad("a non-JSON event")
        if self.recipe.api == OPENAI:
            self._openai(document)
        else:
            self._anthropic(name, document)
        if not self.recipe.whole.startswith(self.got) or (self.text if self.recipe.tool else self.arguments):
            raise Bad("a doubled or wrong piece")

    def _openai(self, document: dict) -> None:
        if "error" in document:
            error = document["error"]
            if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
                raise Bad("an error event not in OpenAI's shape")
            self.errors.append(error)
            return
        for choice in document.get("choices") or []:
            delta = choice.get("delta") or {}
            if "role" in delta:
                self.roles += 1
            if delta.get("content"):
                self.text += delta["content"]
                self.content_events += 1
            for call in delta.get("tool_calls") or []:
                self.arguments += (call.get("function") or {}).get("arguments") or ""
                self.content_events += 1
            if choice.get("finish_reason"):
                self.finishes += 1
        if self.roles > 1:
            raise Bad("a second role preamble")
        if self.finishes > 1:
            raise Bad("a second finish_reason")

    def _anthropic(self, name: str | None, document: dict) -> None:
        kind = document.get("type")
        if name is not None and kind is not None and name != kind:
            raise Bad(f"event {name!r} with data of type {kind!r}")
        if kind == "error" or name == "error":
            error = document.get("error")
            if not (kind == "error" and isinstance(error, dict) and isinstance(error.get("message"), str)):
                raise Bad("an error event not in Anthropic's shape")
            self.errors.append(error)
        elif kind == "message_start":
            self.starts += 1
            if self.starts > 1:
                raise Bad("a second message_start")
        elif kind == "content_block_delta":
            self.indexes.add(document.get("index"))
            delta = document.get("delta") or {}
            if delta.get("type") == "text_delta":
                self.text += delta.get("text") or ""
            elif delta.get("type") == "input_json_delta":
                self.arguments += delta.get("partial_json") or ""
            self.content_events += 1
            if len(self.indexes) > 1:
                raise Bad("content in a second block index")
        elif kind == "message_delta":
            self.deltas += 1
            if self.deltas > 1:
                raise Bad("a second message_delta")
        elif kind == "message_stop":
            self.ended = True

    def verdict(self) -> tuple[str, str]:
        """At the end of the body: (result, reason)."""
        if len(self.errors) == 1:
            if self.recipe.api == OPENAI and not self.ended:
                return "else", "an error event without [DONE] after it"
            return "clean", str(self.errors[0].get("code") or self.errors[0].get("type") or "error")
        if not self.ended:
            return "else", "no end (neither the stream's end nor an error event)"
        if self.got != self.recipe.whole:
            return "else", "a missing piece (the stream ended as if whole)"
        return "whole", ""


def request_of(r: Recipe) -> tuple[str, dict, dict]:
    """(path, JSON body, headers) of a recipe's request, as SillyTavern's sources send them."""
    system = f"CASE: {r.case} You are a storyteller. Continue the story."
    if r.api == ANTHROPIC:
        body = {"model": r.model, "max_tokens": 400, "stream": True, "system": "Be vivid.",
                "messages": [{"role": "user", "content": system}, {"role": "assistant", "content": "Once"},
                             {"role": "user", "content": "Go on."}]}
        return "/v1/messages", body, {"x-api-key": "sk-ant-soak", "anthropic-version": "2023-06-01"}
    body = {"model": r.model, "max_tokens": 400, "stream": True, "temperature": 1,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Go on."}]}
    if r.usage:
        body["stream_options"] = {"include_usage": True}
    if r.tool:
        body["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    return "/v1/chat/completions", body, {"Authorization": "Bearer sk-soak"}


def _error_answer(r: Recipe, status: int, content_type: str, body: bytes) -> tuple[str, str]:
    try:
        document = json.loads(body)
    except ValueError:
        return "else", f"a non-JSON error answer ({status})"
    if "json" not in content_type:
        return "else", f"a JSON error answer without a JSON content type ({status})"
    error = document.get("error") if isinstance(document, dict) else None
    shaped = isinstance(error, dict) and isinstance(error.get("message"), str)
    if r.api == ANTHROPIC:
        shaped = shaped and document.get("type") == "error"
    if not shaped:
        return "else", f"an error answer not in the client's dialect ({status})"
    return "clean", f"{status} {error.get('code') or error.get('type') or ''}".strip()


async def one_request(session: aiohttp.ClientSession, base: str, r: Recipe, limit: float,
                      reading: Reading) -> tuple[str, str, str]:
    """(result, reason, detail) of one request; what it read is in `reading`."""
    path, body, headers = request_of(r)
    leave_events = r.leave[1] if r.leave and r.leave[0] == "events" else None
    leave_seconds = r.leave[1] if r.leave and r.leave[0] == "seconds" else None
    started = time.monotonic()
    try:
        async with asyncio.timeout(min(limit, leave_seconds) if leave_seconds is not None else limit):
            async with session.post(base + path, json=body, headers=headers) as response:
                content_type = response.headers.get("content-type", "")
                if response.status != 200:
                    reading.raw += await response.read()
                    return (*_error_answer(r, response.status, content_type, bytes(reading.raw)), "")
                if not content_type.startswith("text/event-stream"):
                    return "else", "a 200 that is not an event stream", content_type
                sse = Sse()
                async for line in response.content:
                    reading.raw += line
                    event = sse.line(line)
                    if event is None:
                        continue
                    reading.event(*event)
                    if leave_events is not None and reading.content_events >= leave_events:
                        response.close()
                        return "left", f"after {reading.content_events} content events", ""
                if sse.pending:
                    return "else", "an event cut off at the end of the body", ""
                return (*reading.verdict(), "")
    except Bad as e:
        return "else", str(e), _diff(r.whole, reading.got)
    except TimeoutError:
        waited = time.monotonic() - started
        if leave_seconds is not None and waited < limit:
            return "left", f"after {leave_seconds} s", ""
        return "else", "a hang past the deadline", f"{reading.content_events} content events, {len(reading.got)} chars"
    except aiohttp.ClientPayloadError as e:
        return "else", "a body broken off (the connection ended mid-stream)", str(e)[:200]
    except aiohttp.ClientError as e:
        return "else", f"no answer ({type(e).__name__})", str(e)[:200]


def _diff(expected: str, got: str) -> str:
    same = 0
    while same < min(len(expected), len(got)) and expected[same] == got[same]:
        same += 1
    return f"equal for {same} chars; then expected {expected[same:same + 40]!r}, got {got[same:same + 40]!r}"


# --- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    minutes: int
    streams: int
    seed: int
    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[tuple] = field(default_factory=list)  # (t, RSS MiB, open files, threads)
    events: list[dict] = field(default_factory=list)  # {"t", "what"}
    stop_at: float = 0.0
    workdir: Path | None = None
    kept_else: int = 0  # streams of 'anything else' kept in workdir/else/
    proxy_args: list[str] = field(default_factory=list)  # more arguments for mitmdump

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str) -> None:
        self.events.append({"t": round(self.clock(), 1), "what": what})
        print(f"  {self.clock():6.1f} s  {what}", file=sys.stderr, flush=True)


async def client_loop(run: Run, number: int, session: aiohttp.ClientSession, base: str, limit: float) -> None:
    rng = random.Random(f"{run.seed}-pause-{number}")
    await asyncio.sleep(rng.uniform(0, 2))  # not all at once
    count = 0
    while run.clock() < run.stop_at:
        case = f"{run.seed}.{number}.{count}"
        count += 1
        r = recipe(case)
        started = run.clock()
        reading = Reading(r)
        result, reason, detail = await one_request(session, base, r, limit, reading)
        if result == "else" and run.kept_else < 100 and run.workdir is not None:
            run.kept_else += 1
            (run.workdir / "else").mkdir(exist_ok=True)
            (run.workdir / "else" / f"{case}.txt").write_bytes(
                f"{reason}\n{detail}\nstarted at {started:.2f} s\n\n".encode() + bytes(reading.raw))
        run.outcomes.append(Outcome(case, r.kind, r.api, round(started, 2), round(run.clock() - started, 2), result,
                                    reason, detail))
        await asyncio.sleep(rng.uniform(*PAUSE))


async def sampler(run: Run, pid: int) -> None:
    while True:
        rss = status_kib(pid, "VmRSS")
        if rss is not None:
            run.samples.append((round(run.clock(), 1), round(rss / 1024, 1), open_files(pid),
                                # Threads: glibc gives each thread that allocates an arena of its own.
                                status_kib(pid, "Threads")))
        await asyncio.sleep(SAMPLE_EVERY)


async def chaos(run: Run, upstreams: Upstreams, config_path: Path) -> None:
    """Each minute: one upstream killed and started again; the config rewritten."""
    for minute in range(run.minutes):
        name = Upstreams.NAMES[minute % len(Upstreams.NAMES)]
        await asyncio.sleep(max(0.0, minute * MINUTE + KILL_AT - run.clock()))
        upstreams.kill(name)
        run.note(f"upstream {name} killed (SIGKILL)")
        await asyncio.sleep(RESTART_AFTER)
        took = await upstreams.start(name)
        run.note(f"upstream {name} started again on its port (accepting after {took:.1f} s)")
        await asyncio.sleep(max(0.0, minute * MINUTE + RELOAD_AT - run.clock()))
        config_path.write_text(yaml.safe_dump(proxy_config(upstreams.urls, config_path.parent, minute % 2 == 0)))
        run.note("config rewritten (models.fallback toggled)")


async def soak(run: Run, workdir: Path) -> dict:
    raise_open_files_limit()
    run.workdir = workdir
    upstreams = Upstreams(workdir)
    limit = hang_after()
    proxy = None
    try:
        for name in Upstreams.NAMES:
            await upstreams.start(name)
        config_path = workdir / "seaking.yaml"
        config_path.write_text(yaml.safe_dump(proxy_config(upstreams.urls, workdir, False)))
        proxy = WatchedMitmdump(
            "--mode", f"reverse:{upstreams.urls[0]}", "--set", f"seaking_config={config_path}",
            "--set", "flow_detail=0", *run.proxy_args, env={"XDG_CACHE_HOME": str(workdir / "cache")},
            log_path=workdir / "proxy.log", clock=run.clock,
        )
        url = await proxy.start()
        pid = proxy.process.pid
        run.t0 = time.monotonic()
        run.stop_at = run.minutes * MINUTE
        run.note(f"proxy (pid {pid}) at {url}; upstreams at {', '.join(upstreams.urls)}; {run.streams} clients")
        background = [asyncio.create_task(sampler(run, pid)), asyncio.create_task(chaos(run, upstreams, config_path))]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
            progress = asyncio.create_task(_progress(run))
            await asyncio.gather(*(client_loop(run, n, session, url, limit) for n in range(run.streams)))
            progress.cancel()
        run.note("every client done")
        background[1].cancel()
        drained = run.clock()
        await asyncio.sleep(SAMPLE_EVERY * 3)  # a few samples with nothing in flight
        background[0].cancel()
        idle = [s for s in run.samples if s[0] > drained + SAMPLE_EVERY]
        status = await _status(url)
        problems_before_stop = len(proxy.problems)
        exit_code = await proxy.stop()
        run.note(f"proxy stopped (exit code {exit_code})")
        return {
            "status": status,
            "exit_code": exit_code,
            "problems": proxy.problems,
            "problems_at_stop": len(proxy.problems) - problems_before_stop,
            "reloads": proxy.reloads,
            "before": {"rss_mib": run.samples[0][1], "open_files": run.samples[0][2]} if run.samples else None,
            "idle_after": {"rss_mib": idle[-1][1], "open_files": idle[-1][2]} if idle else None,
        }
    finally:
        if proxy is not None and proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop()
        upstreams.stop()


async def _progress(run: Run) -> None:
    while True:
        await asyncio.sleep(30)
        results = Counter(o.result for o in run.outcomes)
        rss = run.samples[-1][1] if run.samples else None
        fds = run.samples[-1][2] if run.samples else None
        print(f"  {run.clock():6.1f} s  {sum(results.values())} requests: {dict(results)}; RSS {rss} MiB, "
              f"{fds} open files", file=sys.stderr, flush=True)


async def _status(url: str) -> dict | None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url + "/_seaking/status") as response:
                return await response.json()
    return None


# --- the report ------------------------------------------------------------------------------------------------------


def summarise(run: Run, found: dict, environment: dict) -> dict:
    minutes = []
    for minute in range(run.minutes):
        low, high = minute * MINUTE, (minute + 1) * MINUTE
        outcomes = [o for o in run.outcomes if low <= o.started < high]
        results = Counter(o.result for o in outcomes)
        samples = [s for s in run.samples if low <= s[0] < high]
        last = minute == run.minutes - 1
        problems = [p for p in found["problems"] if low <= p["t"] < high or (last and p["t"] >= high)]
        whole_seconds = [o.seconds for o in outcomes if o.result == "whole"]
        minutes.append({
            "minute": minute + 1,
            "requests": len(outcomes),
            "whole": results["whole"],
            "clean_errors": results["clean"],
            "left": results["left"],
            "anything_else": results["else"],
            "else_reasons": dict(Counter(o.reason for o in outcomes if o.result == "else")),
            "log_problems": len(problems),
            "rss_mib": statistics.median(s[1] for s in samples) if samples else None,
            "rss_mib_max": max((s[1] for s in samples), default=None),
            "open_files": statistics.median(s[2] for s in samples) if samples else None,
            "open_files_max": max((s[2] for s in samples), default=None),
            "whole_p50_s": _pct(whole_seconds, 50),
            "whole_p95_s": _pct(whole_seconds, 95),
            "events": [e["what"] for e in run.events if low <= e["t"] < high],
        })
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in run.outcomes:
        by_kind[f"{o.api}: {o.kind}"][o.result] += 1
    else_examples: dict[str, list] = defaultdict(list)
    for o in run.outcomes:
        if o.result == "else" and len(else_examples[o.reason]) < 5:
            else_examples[o.reason].append({"case": o.case, "kind": o.kind, "api": o.api, "started_s": o.started,
                                            "seconds": o.seconds, "detail": o.detail})
    totals = Counter(o.result for o in run.outcomes)
    verdict = _verdict(minutes, totals, found)
    return {
        "environment": environment,
        "config": CONFIG,
        "minutes": minutes,
        "totals": {
            "requests": len(run.outcomes), "whole": totals["whole"], "clean_errors": totals["clean"],
            "left": totals["left"], "anything_else": totals["else"],
            "else_reasons": dict(Counter(o.reason for o in run.outcomes if o.result == "else")),
            "log_problems": len(found["problems"]), "log_problems_at_stop": found["problems_at_stop"],
            "clean_errors_by_code": dict(Counter(o.reason for o in run.outcomes if o.result == "clean").most_common()),
            "reloads_seen": len(found["reloads"]), "proxy_exit_code": found["exit_code"],
            "before_load": found["before"], "idle_after": found["idle_after"],
        },
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "else_examples": else_examples,
        "log_problems": found["problems"][:20],
        "events": run.events,
        "samples": run.samples,
        "targets": [{k: t.get(k) for k in ("url", "state", "requests", "failures")}
                    for t in (found["status"] or {}).get("targets", [])],
        "verdict": verdict,
    }


def _pct(values: list[float], q: float) -> float | None:
    found = percentile(values, q)
    return None if found is None else round(found, 2)


def _verdict(minutes: list[dict], totals: Counter, found: dict) -> dict:
    reasons = []
    if totals["else"]:
        reasons.append(f"{totals['else']} request(s) in 'anything else'")
    if found["problems"]:
        reasons.append(f"{len(found['problems'])} traceback(s) or log error(s)")
    flat = {}
    if len(minutes) >= 3:
        second, last = minutes[1], minutes[-1]
        for key, name in (("rss_mib", "RSS"), ("open_files", "open files")):
            if second[key] and last[key] is not None:
                ratio = last[key] / second[key]
                flat[key] = round(ratio, 3)
                if abs(ratio - 1) > FLAT:
                    reasons.append(f"{name} of the last minute {ratio:.2f} × the second minute's")
    else:
        reasons.append("too short to judge growth (the pass line compares minute 2 with the last, of 3 or more)")
    return {"passed": not reasons, "why_not": reasons, "last_over_second": flat}


def markdown(data: dict, plot_note: str, command: str) -> str:
    env, totals, verdict = data["environment"], data["totals"], data["verdict"]
    lines = [
        "# Chaos soak",
        "",
        f"`{command}`: {env['minutes']} minute(s), {env['streams']} concurrent streams, seed {env['seed']}. "
        "How it works: the docstring of `benchmarks/soak.py` (and `benchmarks/soak_upstream.py` for the faults).",
        "",
        f"**{'PASSED' if verdict['passed'] else 'NOT PASSED'}**"
        + ("" if verdict["passed"] else ": " + "; ".join(verdict["why_not"])) + ".",
        "",
        f"{env['date']}, revision {env['revision']}, {env['cpus']} CPUs (load average before {env['load_before']}, "
        f"after {env['load_after']}), Python {env['python']}, mitmproxy {env['mitmproxy']}, aiohttp {env['aiohttp']}. "
        f"A request still running {env['hang_after_s']:g} s after it began counts as a hang.",
        "",
    ]
    if plot_note:
        lines += [plot_note, ""]
    lines += [
        "| minute | requests | whole | clean errors | left | anything else | tracebacks, log errors | RSS MiB "
        "| open files "
        "| whole p50 / p95 s | chaos |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in data["minutes"]:
        lines.append(
            f"| {m['minute']} | {m['requests']} | {m['whole']} | {m['clean_errors']} | {m['left']} | "
            f"{m['anything_else']}{_reasons(m['else_reasons'])} | {m['log_problems']} | {_num(m['rss_mib'])} | "
            f"{_num(m['open_files'])} | {_num(m['whole_p50_s'])} / {_num(m['whole_p95_s'])} | "
            f"{'; '.join(filter(None, (_short(e) for e in m['events'])))} |"
        )
    lines.append(
        f"| **all** | **{totals['requests']}** | **{totals['whole']}** | **{totals['clean_errors']}** | "
        f"**{totals['left']}** | **{totals['anything_else']}** | **{totals['log_problems']}** | | | | |"
    )
    flat = verdict["last_over_second"]
    lines += [
        "",
        "RSS and open files are the medians of samples every 2 s in the minute (the maxima are in the JSON); "
        "requests are counted in the minute they began. The last minute's RSS "
        + (f"is {flat['rss_mib']:.2f} × the second minute's and its open files {flat['open_files']:.2f} ×."
           if {"rss_mib", "open_files"} <= flat.keys() else "and open files were not compared (too short a run).")
        + _idle(totals)
        + f" The config was reloaded {totals['reloads_seen']} time(s) (the proxy's log says so); the proxy exited "
        f"with {totals['proxy_exit_code']} when stopped, with {totals['log_problems_at_stop']} log problem(s) while "
        "stopping.",
        "",
    ]
    if totals["else_reasons"]:
        lines += ["## Anything else", "", "| reason | requests | examples (case: kind, detail) |",
                  "| --- | ---: | --- |"]
        for reason, count in sorted(totals["else_reasons"].items(), key=lambda item: -item[1]):
            examples = "<br>".join(f"`{e['case']}` {e['api']}: {e['kind']}, {e['seconds']} s"
                                   + (f", {e['detail']}" if e["detail"] else "")
                                   for e in data["else_examples"][reason][:3])
            lines.append(f"| {reason} | {count} | {examples.replace('|', '/')} |")
        lines.append("")
    if data["log_problems"]:
        lines += ["## Log problems", ""]
        for problem in data["log_problems"][:5]:
            lines += [f"At {problem['t']} s:", "", "```", problem["line"], *problem["context"][:25], "```", ""]
    lines += [
        "## By kind of request",
        "",
        "Every kind may come to a whole reply or a clean error (a fault that never ends is answered with an error; "
        "one that ends may still use up the attempts); anything else is never right.",
        "",
        "| kind | requests | whole | clean errors | left | anything else |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, counts in data["by_kind"].items():
        lines.append(f"| {kind} | {sum(counts.values())} | {counts.get('whole', 0)} | {counts.get('clean', 0)} | "
                     f"{counts.get('left', 0)} | {counts.get('else', 0)} |")
    lines += ["", "Clean errors by what the client was told (status and code; an error event's code):", ""]
    lines += [f"- {code}: {count}" for code, count in totals["clean_errors_by_code"].items()]
    if data["targets"]:
        lines += ["", "The targets at the end (`/_seaking/status`): "
                  + "; ".join(f"{t['url']} {t['state']}, {t['requests']} requests, {t['failures']} failed"
                              for t in data["targets"]) + "."]
    lines += ["", "The proxy's config (besides the two targets and the models cache):", "", "```yaml",
              yaml.safe_dump(data["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _idle(totals: dict) -> str:
    before, after = totals.get("before_load"), totals.get("idle_after")
    if not before or not after:
        return ""
    return (f" Before the load the proxy had {before['rss_mib']:g} MiB and {before['open_files']} open files; once "
            f"every client was done, {after['rss_mib']:g} MiB and {after['open_files']} (pooled connections to the "
            "upstreams stay open).")


def _reasons(reasons: dict) -> str:
    return (" (" + ", ".join(f"{r} ×{n}" for r, n in reasons.items()) + ")") if reasons else ""


def _short(event: str) -> str:
    if "killed" in event:
        return event.split(" killed")[0].replace("upstream ", "") + " killed"
    if "started again" in event:
        return event.split(" started")[0].replace("upstream ", "") + " back"
    if "config" in event:
        return "reload"
    return ""


def _num(value) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, int) or value == int(value) else f"{value:.1f}"


def draw_plot(data_path: Path, png: Path) -> str:
    python = litellm_way.plotting_python(litellm_way.venv_python(litellm_way.venv_dir()))
    if python is None:
        return ("No plot: matplotlib is not importable here nor in the benchmark's LiteLLM venv (set "
                "SEAKING_PLOT_PYTHON to a Python that has it).")
    done = subprocess.run([str(python), "-m", "benchmarks.soak_plot", str(data_path), str(png)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"No plot: benchmarks/soak_plot.py failed ({done.stderr.strip().splitlines()[-1:]})."
    return f"![Requests by outcome, RSS and open files over the run]({png.name})"


async def main_async(arguments: argparse.Namespace) -> int:
    run = Run(arguments.minutes, arguments.streams, arguments.seed, proxy_args=arguments.proxy_arg)
    environment = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "revision": git_revision(),
        "minutes": run.minutes, "streams": run.streams, "seed": run.seed, "cpus": os.cpu_count(),
        "python": platform.python_version(), "mitmproxy": importlib.metadata.version("mitmproxy"),
        "aiohttp": aiohttp.__version__, "load_before": load_average(), "hang_after_s": hang_after(),
    }
    with contextlib.ExitStack() as stack:
        if arguments.workdir:
            workdir = arguments.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seaking-soak-")))
        found = await soak(run, workdir)
    environment["load_after"] = load_average()
    data = summarise(run, found, environment)
    command = "python -m benchmarks.soak " + " ".join(sys.argv[1:])
    plot_note = ""
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        data_path = arguments.out.with_suffix(".json")
        data_path.write_text(json.dumps(data, indent=1))
        plot_note = draw_plot(data_path, arguments.out.with_suffix(".png"))
    text = markdown(data, plot_note, command.strip())
    print(text)
    if arguments.out:
        arguments.out.write_text(text)
    return 0 if data["verdict"]["passed"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--streams", type=int, default=200,
                        help="concurrent clients, each streaming one reply at a time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the report here (markdown; its JSON and PNG beside it)")
    parser.add_argument("--workdir", type=Path, help="keep the logs and config here (default: a temporary directory)")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for mitmdump (repeat it), e.g. --proxy-arg=-s --proxy-arg=probe.py")
    sys.exit(run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
