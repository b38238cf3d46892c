"""What does it cost to reach an OpenAI-compatible upstream through seaking-proxy? Side by side, in one run.

    .venv/bin/python -m benchmarks.bench [--quick] [--rounds N] [--out docs/benchmark.md]
                                         [--ways direct,mitmdump-stream,seaking-proxy] [--addon other/addon.py]

(from the project's root: the benchmarks are a package). The parts: scenarios.py (what is measured, the load
generator), processes.py (the processes and the ways), stats.py (figures, aggregation, goals), report.py (the
markdown report); this module runs the rounds and the command line.

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
  seaking-haproxy-2 ..... the same in front of two seaking-proxy processes (the scale-out of docs/running.md)
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
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import litellm_way as litellm_way_module
from benchmarks.processes import (
    REPO, WAY_NAMES, Reached, Way, all_ways, raise_open_files_limit, run, status_kib, upstream, watch_processes,
)
from benchmarks.report import environment, load_average, progress, report
from benchmarks.scenarios import FAIL_RATE, FAULT_CONCURRENCY, Scenario, applies, run_scenario, scenarios
from benchmarks.stats import add_overheads, aggregate, ratios, summarise, summarise_faults


# --- the run -------------------------------------------------------------------------------------------------------


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


# --- command line --------------------------------------------------------------------------------------------------


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
        raw = run(bench(ways, plan, rounds, 400 if args.quick else 1600, Path(workdir), skipped))
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
    tables, document = report(raw, names, plan, plot_note, __doc__)
    print(tables)
    out.write_text(document)
    progress(f"\nwritten to {out} ({raw['run_seconds']:.0f} s); {plot_note}")


def draw_plot(raw: dict, png: Path, litellm_python: Path) -> str:
    """Draws benchmarks/plot.py's PNG with whichever python has matplotlib: this one, or the LiteLLM venv's. The
    markdown that shows it, or a note saying why there is none (an old PNG is then removed: it would mislead)."""
    python = litellm_way_module.plotting_python(litellm_python)
    if python is None:
        png.unlink(missing_ok=True)
        return ("No plot: matplotlib is not importable here nor in LiteLLM's venv "
                "(`pip install -r benchmarks/requirements.txt` into a venv that runs bench.py).")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    try:
        done = subprocess.run([str(python), "-m", "benchmarks.plot", f.name, str(png.resolve())], cwd=REPO,
                              capture_output=True, text=True, timeout=180, check=False)
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
