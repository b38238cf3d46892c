"""The headline figure: how many streamed replies arrive whole under a mix of real faults, and how long they take.

    .venv/bin/python -m benchmarks.fault_mix [--rounds 3] [--out docs/fault-mix.md] [--quick]

Each round sends the same 48 streaming chat requests (SillyTavern's shape) at once, every way in turn, the order of the
ways rotating from round to round. Each request follows a script of its own on the fault upstream
(seaking/lab/fault_upstream.py; its retries and continuations included), from this mix:

    10 good ............. the reply streams at once (1 s to the first word, then 120 words, 60 ms apart)
     5 429 first ........ 429 with Retry-After: 1, then the good reply
     5 503 first ........ 503, then the good reply
     8 drop ............. the connection drops after 5-100 words
     6 stall ............ the upstream goes silent after 5-100 words
     5 blank ............ a well-formed reply with no content, then the good reply
     5 late first event . the first word after 8 s
     4 early end ........ the stream ends without [DONE] or a finish_reason after 5-100 words

A reply is **whole** when the client read exactly the upstream's whole text, ended by [DONE], with no error event. A
client gives up after 120 s (SillyTavern itself would wait for ever on a stalled stream).
Ways: the client straight to the upstream; the proxy with healing off (no resume, no hedging: the proxy before these
features); with resume but no hedging; and with its defaults. Every proxy is `mitmdump -s addon.py` with the default
config but `prefill: assistant` (an upstream that continues a trailing assistant message, as OpenRouter and local
servers do). The same round also streams 48 good replies through the proxy with its defaults: the fault-free figure
the goal compares with (p95 time to a whole reply at most 3 × the fault-free p95).

Two sweeps follow the rounds, each run once per setting: the stall cases alone with idle_timeout 5, 10, 15, 20 and 30 s
(what a stall costs); and a stuck first attempt (no first event ever; the second attempt is good), a slow first attempt
(first event after 20 s; the second is good) and an upstream slow for everyone (every attempt's first event after 20 s),
with hedging on and off and first_event_timeout 15, 30 and 60 s (what the per-try timeout costs). --quick: one round,
no sweeps; --sweeps-only: the sweeps again, the rounds from the report's .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import yaml

from benchmarks.processes import run
from benchmarks.stats import percentile
from seaking.lab.fault_upstream import Blank, Delayed, FaultyUpstream, Status, Stream, split_words
from seaking.lab.harness import Mitmdump

ROOT = Path(__file__).resolve().parent.parent
WORDS = split_words(" ".join(f"word{i}" for i in range(120)))
REPLY = "".join(WORDS)
CHUNK_DELAY = 0.06
FIRST_WORD = 1.0
CLIENT_TIMEOUT = 120  # SillyTavern waits for ever on a stalled stream; here a reply 2 minutes late is a hang
PROXY_BASE = {"target_proxy": {"prefill": "assistant"}, "health_check": {"interval": 0}}
WAYS = {
    "direct": None,
    "proxy, healing off": {"streaming": {"resume": False}, "error_handling": {"hedge_on_timeout": False}},
    "proxy, resume, no hedging": {"error_handling": {"hedge_on_timeout": False}},
    "proxy (defaults)": {},
}


def good() -> Delayed:
    return Delayed(FIRST_WORD, then=Stream(chunks=WORDS, delay=CHUNK_DELAY))


def mix(rng: random.Random) -> list[tuple[str, list]]:
    """(kind, faults) of each request: the faults its attempts meet in turn (then the good reply)."""
    def at() -> int:
        return rng.randint(5, 100)

    cases = [("good", [good()])] * 10
    cases += [("429 first", [Status(429, headers={"Retry-After": "1"}), good()])] * 5
    cases += [("503 first", [Status(503), good()])] * 5
    cases += [("drop", [Delayed(FIRST_WORD, then=Stream(chunks=WORDS, delay=CHUNK_DELAY, drop_after=at())), good()]) for _ in range(8)]
    cases += [("stall", [Delayed(FIRST_WORD, then=Stream(chunks=WORDS, delay=CHUNK_DELAY, stall_after=at())), good()]) for _ in range(6)]
    cases += [("blank", [Delayed(FIRST_WORD, then=Blank()), good()])] * 5
    cases += [("late first event", [Stream(chunks=WORDS, delay=CHUNK_DELAY, first_event_after=8)])] * 5
    cases += [
        ("early end", [Delayed(FIRST_WORD, then=Stream(chunks=WORDS[:at()], delay=CHUNK_DELAY, no_done=True, finish_reason=None)), good()])
        for _ in range(4)
    ]
    return cases


@dataclass
class Result:
    kind: str
    whole: bool
    seconds: float
    ending: str  # whole, an error event's code, or what went wrong on the client's side


@dataclass
class Run:
    way: str
    results: list[Result] = field(default_factory=list)

    @property
    def whole_rate(self) -> float:
        return sum(r.whole for r in self.results) / len(self.results)

    def p(self, q: float) -> float | None:
        return percentile([r.seconds for r in self.results if r.whole], q)


async def read_reply(session: aiohttp.ClientSession, url: str, case: str, kind: str) -> Result:
    body = {"model": "model-a", "stream": True, "max_tokens": 1000,
            "messages": [{"role": "user", "content": f"CASE: {case} Tell me a story."}]}
    started = time.monotonic()
    text, done, errors = "", False, []
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-bench"}) as response:
            if response.status != 200:
                return Result(kind, False, time.monotonic() - started, f"HTTP {response.status}")
            async for line in response.content:
                data = line.strip()
                if not data.startswith(b"data:"):
                    continue
                payload = data[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                event = json.loads(payload)
                if "error" in event:
                    errors.append(event["error"].get("code") or "error")
                for choice in event.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
    except (aiohttp.ClientError, TimeoutError) as e:
        return Result(kind, False, time.monotonic() - started, type(e).__name__)
    whole = text == REPLY and done and not errors
    ending = "whole" if whole else (errors[0] if errors else "incomplete" if not done else "text differs")
    return Result(kind, whole, time.monotonic() - started, ending)


async def run_way(way: str, overrides: dict | None, cases: list[tuple[str, list]], workdir: Path) -> Run:
    upstream = FaultyUpstream()
    await upstream.start()
    for number, (_, faults) in enumerate(cases):
        upstream.script("chat/completions", *faults, case=f"c{number}")
    proxy = None
    try:
        url = upstream.url
        if overrides is not None:
            config = workdir / f"config-{time.monotonic_ns()}.yaml"
            merged = _merge(_merge(PROXY_BASE, {"models": {"cache_file": str(workdir / "models.json")}}), overrides)
            config.write_text(yaml.safe_dump(merged))
            proxy = Mitmdump(
                "--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}",
                "--set", "flow_detail=0",
            )
            url = await proxy.start()
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await asyncio.gather(*(read_reply(session, url, f"c{n}", kind) for n, (kind, _) in enumerate(cases)))
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()
    return Run(way, list(results))


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def summary(run: Run, fault_free_p95: float | None) -> dict:
    p95 = run.p(95)
    by_kind: dict[str, list[bool]] = {}
    for r in run.results:
        by_kind.setdefault(r.kind, []).append(r.whole)
    endings: dict[str, int] = {}
    for r in run.results:
        if not r.whole:
            endings[r.ending] = endings.get(r.ending, 0) + 1
    return {
        "whole_rate": round(run.whole_rate, 3),
        "p50_s": _round(run.p(50)),
        "p95_s": _round(p95),
        "max_s": _round(max((r.seconds for r in run.results if r.whole), default=None)),
        "p95_over_fault_free": _round(p95 / fault_free_p95 if p95 and fault_free_p95 else None),
        "whole_by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in by_kind.items()},
        "not_whole": endings,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def rounds(count: int, seed: int, workdir: Path) -> dict:
    raw: dict[str, list[dict]] = {way: [] for way in WAYS}
    raw["fault-free (proxy, defaults)"] = []
    names = list(WAYS)
    for number in range(count):
        cases = mix(random.Random(seed + number))
        fault_free = await run_way("fault-free", {}, [("good", [good()])] * len(cases), workdir)
        raw["fault-free (proxy, defaults)"].append(summary(fault_free, fault_free.p(95)))
        order = names[number % len(names):] + names[:number % len(names)]
        for way in order:
            print(f"round {number + 1}: {way} ...", flush=True)
            result = await run_way(way, WAYS[way], cases, workdir)
            raw[way].append(summary(result, fault_free.p(95)))
            print(f"  {raw[way][-1]}", flush=True)
    return raw


async def idle_sweep(seed: int, workdir: Path) -> dict:
    """The stall cases alone, with each idle_timeout: what a stall costs with resume."""
    rng = random.Random(seed)
    stalls = [("stall", [Delayed(FIRST_WORD, then=Stream(chunks=WORDS, delay=CHUNK_DELAY, stall_after=rng.randint(5, 100))),
                         good()]) for _ in range(8)]
    found = {}
    for idle in (5, 10, 15, 20, 30):
        print(f"idle_timeout {idle} s ...", flush=True)
        result = await run_way(f"idle {idle}", {"streaming": {"idle_timeout": idle}}, stalls, workdir)
        found[str(idle)] = summary(result, None)
    return found


async def first_event_sweep(workdir: Path) -> dict:
    """A stuck first attempt (headers, then never a first event), the second attempt good: with hedging on and off,
    and each first_event_timeout. The first attempt is stuck, so hedging only adds the wait for it to be closed."""
    slow_start = Stream(chunks=WORDS, delay=CHUNK_DELAY, first_event_after=20)
    cases = [("stuck first attempt", [Stream(chunks=WORDS, first_event_after=3600), good()])] * 4
    cases += [("slow first attempt", [slow_start, good()])] * 4
    cases += [("slow every attempt", [slow_start] * 5)] * 4  # an upstream slow for everyone
    found = {}
    for timeout in (15, 30, 60):
        for hedging in (True, False):
            key = f"first_event_timeout {timeout} s, hedging {'on' if hedging else 'off'}"
            print(f"{key} ...", flush=True)
            overrides = {"streaming": {"first_event_timeout": timeout}, "error_handling": {"hedge_on_timeout": hedging}}
            result = await run_way(key, overrides, cases, workdir)
            found[key] = {kind: summary(Run(key, [r for r in result.results if r.kind == kind]), None)
                          for kind in dict(cases)}
    return found


def spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(present) == 1:
        return f"{present[0]:g}"
    return f"{statistics.median(present):g} ({min(present):g}–{max(present):g})"


def report(raw: dict, idle: dict, first_event: dict, count: int) -> str:
    lines = [
        "# Fault mix: whole replies under real faults",
        "",
        f"Produced by `python -m benchmarks.fault_mix` ({count} round{'s' if count != 1 else ''}; medians, with the lowest "
        "and highest round in brackets). The method is in that module's docstring: 48 streaming requests at once, each "
        "with its own faults, the same mix for every way.",
        "",
        "| way | whole replies | p50 s | p95 s | p95 ÷ fault-free p95 | not whole |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for way, summaries in raw.items():
        endings: dict[str, int] = {}
        for s in summaries:
            for k, v in s["not_whole"].items():
                endings[k] = endings.get(k, 0) + v
        lines.append(
            f"| {way} | {spread([s['whole_rate'] * 100 for s in summaries])} % | {spread([s['p50_s'] for s in summaries])} "
            f"| {spread([s['p95_s'] for s in summaries])} | {spread([s['p95_over_fault_free'] for s in summaries])} "
            f"| {', '.join(f'{k} ×{v}' for k, v in sorted(endings.items())) or '—'} |"
        )
    lines += ["", "Whole replies by fault (last round):", "", "| way | " + " | ".join(raw["direct"][-1]["whole_by_kind"]) + " |",
              "| --- |" + " --- |" * len(raw["direct"][-1]["whole_by_kind"])]
    for way, summaries in raw.items():
        if "fault-free" in way:
            continue
        lines.append(f"| {way} | " + " | ".join(summaries[-1]["whole_by_kind"].values()) + " |")
    if idle:
        lines += ["", "What a stall costs (the stall cases alone, resume on): time to the whole reply by `idle_timeout`.", "",
                  "| idle_timeout | whole | p50 s | p95 s | max s |", "| --- | --- | --- | --- | --- |"]
        for setting, s in idle.items():
            lines.append(f"| {setting} s | {s['whole_rate'] * 100:g} % | {s['p50_s']} | {s['p95_s']} | {s['max_s']} |")
    if first_event:
        lines += ["", "What the per-try timeout costs: a stuck first attempt (never a first event) then a good one; a slow "
                  "first attempt (its first event after 20 s) then a good one; and an upstream slow for everyone (every "
                  "attempt's first event after 20 s). Whole replies, and the median time to one.", "",
                  "| setting | stuck first attempt | slow first attempt | slow every attempt |", "| --- | --- | --- | --- |"]
        for setting, kinds in first_event.items():
            cells = [f"{k['whole_rate'] * 100:g} %, {k['p50_s'] if k['p50_s'] is not None else '—'} s" for k in kinds.values()]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="seaking-fault-mix-") as workdir:
        if args.sweeps_only:  # the rounds of the report written before
            earlier = json.loads(args.out.with_suffix(".json").read_text())
            raw, count = earlier["rounds"], len(next(iter(earlier["rounds"].values())))
        else:
            count = 1 if args.quick else args.rounds
            raw = await rounds(count, args.seed, Path(workdir))
        idle = {} if args.quick else await idle_sweep(args.seed, Path(workdir))
        first_event = {} if args.quick else await first_event_sweep(Path(workdir))
    text = report(raw, idle, first_event, count)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"rounds": raw, "idle": idle, "first_event": first_event}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one round, no sweeps")
    parser.add_argument("--out", type=Path, help="write the report here (and its data beside it, .json)")
    parser.add_argument("--sweeps-only", action="store_true", help="run the sweeps again, the rounds taken from --out's .json")
    run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
