"""What the benchmark says: progress on stderr, the markdown tables and summary lines, the environment a run was
made in (versions, revision, load average), and the whole report document."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import aiohttp

from benchmarks.processes import REPO
from benchmarks.scenarios import CHUNK_DELAY, FAIL_RATE, STREAM_CHUNKS, Scenario
from benchmarks.stats import GOALS, RATIOS


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


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


def report(raw: dict, ways: list[str], plan: list[Scenario], plot_note: str, method: str) -> tuple[str, str]:
    """(tables for the terminal, the whole markdown document). `method`: bench.py's docstring, whose part from
    "Setup." on is the report's last section."""
    env = raw["environment"]
    tables = markdown_tables(raw["aggregate"], raw["ratios"], raw, ways, plan)
    legend = method.split("Setup.", 1)[1]
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
