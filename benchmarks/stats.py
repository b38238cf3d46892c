"""The benchmark's figures: each run summarised (percentiles, failures by kind), the TTFT overhead over direct, the
rounds aggregated into medians and ranges, ratios taken within a round, and the goals they are judged against."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from benchmarks.scenarios import Run, Scenario


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
