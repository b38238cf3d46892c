"""Charts of a benchmark run as one PNG: medians of the rounds as bars or points, a line from the lowest to the highest
round through each.

    python -m benchmarks.plot RAW.json OUT.png

RAW.json is the raw-results object bench.py writes ({"environment", "aggregate", "ratios", "faults", ...}). Needs
matplotlib (benchmarks/requirements.txt), which the project itself does not: bench.py runs this with whichever
interpreter can import it, and skips the plot with a note otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

COLOURS = {"direct": "#9e9e9e", "mitmdump": "#8da0cb", "mitmdump-stream": "#66c2a5", "seaking-proxy": "#e4572e",
           "seaking-haproxy-1": "#f4a261", "seaking-haproxy-2": "#b5651d", "litellm": "#7b3294"}


def found(raw: dict, way: str, scenario: str, key: str) -> dict | None:
    return ((raw["aggregate"].get(way) or {}).get(scenario) or {}).get(key)


def label(number: float | None) -> str:
    if number is None:
        return "n/a"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 10:
        return f"{number:.0f}"
    return f"{number:.1f}" if abs(number) >= 1 else f"{number:.2f}"


def plain(y: float, _pos=None) -> str:
    return "0" if y == 0 else f"{y:,.0f}" if abs(y) >= 1 else f"{y:g}"


def bars(ax, title: str, unit: str, groups: list[tuple[str, str]], key: str, ways: list[str], raw: dict,
         log: bool = False, higher_is_better: bool = False) -> None:
    """Grouped bars: one group per scenario, one bar per way, with the rounds' range as an error line."""
    shown = [w for w in ways if any(found(raw, w, s, key) for s, _ in groups)]
    width = 0.8 / max(len(shown), 1)
    for i, way in enumerate(shown):
        xs, heights, low, high = [], [], [], []
        for g, (scenario, _) in enumerate(groups):
            value = found(raw, way, scenario, key)
            if not value:
                continue
            xs.append(g + (i - (len(shown) - 1) / 2) * width)
            heights.append(max(value["median"], 1e-3) if log else value["median"])
            low.append(heights[-1] - value["min"] if value["min"] > 0 or not log else 0)
            high.append(value["max"] - heights[-1])
        bar = ax.bar(xs, heights, width * 0.92, color=COLOURS.get(way, "#cccccc"), label=way, yerr=[low, high],
                     capsize=2, error_kw={"elinewidth": 0.8})
        for rect, height in zip(bar, heights, strict=True):
            ax.annotate(label(height), (rect.get_x() + rect.get_width() / 2, height), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(groups)), [name for _, name in groups])
    ax.set_ylabel(unit)
    ax.set_title(f"{title}\n({'higher' if higher_is_better else 'lower'} is better{', log scale' if log else ''})",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def goals(ax, raw: dict) -> None:
    """Each goal's ratio (median, range of rounds) against its limit."""
    items = [(name, r) for name, r in raw["ratios"].items() if "goal" in r and "median" in r]
    for y, (_, r) in enumerate(items):
        ok = r["verdict"] == "met"
        colour = "#2a9d8f" if ok else "#e76f51" if r["verdict"] == "missed" else "#e9c46a"
        ax.plot([r["min"], r["max"]], [y, y], color=colour, linewidth=3, solid_capstyle="round")
        ax.plot([r["median"]], [y], "o", color="black", markersize=5)
        ax.plot([r["goal"]], [y], "|", color="black", markersize=16, markeredgewidth=2)
        ax.annotate(f"{r['median']:.2f} ({r['verdict']})", (r["max"], y), xytext=(6, -3), textcoords="offset points",
                    fontsize=8)
    ax.set_yticks(range(len(items)), [name.replace(", ÷", "\n÷") for name, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_title("Goals: seaking-proxy ÷ mitmproxy within each round\n(dot: median, bar: lowest–highest round, "
                 "tick: goal)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def prompt_sizes(ax, raw: dict, ways: list[str]) -> None:
    sizes = [(1, "prompt_1k"), (16, "prompt_16k"), (256, "prompt_256k"), (1024, "prompt_1024k")]
    for way in ways:
        points = [(kib, found(raw, way, key, "ttft_p50_ms")) for kib, key in sizes]
        points = [(kib, v) for kib, v in points if v]
        if not points:
            continue
        xs = [kib for kib, _ in points]
        ys = [v["median"] for _, v in points]
        errors = [[y - v["min"] for y, (_, v) in zip(ys, points, strict=True)],
                  [v["max"] - y for y, (_, v) in zip(ys, points, strict=True)]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", color=COLOURS.get(way, "#cccccc"), label=way, capsize=2)
    ax.set_xscale("log")
    ax.set_xticks([1, 16, 256, 1024], ["1 KiB", "16 KiB", "256 KiB", "1 MiB"])
    ax.set_ylabel("ms")
    ax.set_title("Streaming: time to first token by prompt size, p50\n(lower is better)", fontsize=10)
    ax.grid(alpha=0.3)


def plot(raw: dict, out: Path) -> None:
    ways, env = raw["ways"], raw["environment"]
    streamers = [w for w in ways if w not in ("mitmdump",)]
    fig, axes = plt.subplots(4, 2, figsize=(16, 20))
    bars(axes[0][0], "Non-streaming chat: throughput", "successful requests / s",
         [("chat_1", "1 client"), ("chat_16", "16 clients")], "rps", ways, raw, log=True, higher_is_better=True)
    bars(axes[0][1], "Non-streaming chat: latency p50", "ms", [("chat_1", "1 client"), ("chat_16", "16 clients")],
         "p50_ms", ways, raw, log=True)
    stream_groups = [("stream_1", "1"), ("stream_16", "16"), ("stream_100", "100"),
                     ("stream_100_spread", "100 spread\nover 1 s"), ("stream_1000", "1,000")]
    bars(axes[1][0], "Streaming: time to first token, overhead over direct, p50", "ms", stream_groups,
         "ttft_overhead_p50_ms", [w for w in streamers if w != "direct"], raw, log=True)
    bars(axes[1][1], "Streaming: gap between chunks, p99 (the upstream sends every "
         f"{env['upstream']['chunk_delay_s'] * 1000:.0f} ms)", "ms", stream_groups, "gap_p99_ms", streamers, raw)
    bars(axes[2][0], "Proxy resident memory, peak", "MiB", [("stream_100", "100 streams"),
         ("stream_1000", "1,000 streams")], "peak_rss_mib", [w for w in streamers if w != "direct"], raw)
    prompt_sizes(axes[2][1], raw, streamers)
    scale_ways = [w for w in ways if w.startswith("seaking")]
    bars(axes[3][0], "Scale-out: seaking-proxy alone, and 1 or 2 processes behind HAProxy, TTFT p50", "ms",
         [("stream_100", "100 streams"), ("stream_1000", "1,000 streams")], "ttft_p50_ms", scale_ways, raw, log=True)
    goals(axes[3][1], raw)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS.get(w, "#cccccc")) for w in ways]
    fig.legend(handles, ways, loc="upper center", ncol=len(ways), fontsize=11, frameon=False,
               bbox_to_anchor=(0.5, 0.966))
    subtitle = (f"{env['date'][:10]}, {env['mode']} run, medians of {env['rounds']} interleaved rounds "
                f"(lines: lowest to highest round), {env['cpus']} CPUs, loopback")
    fig.suptitle("seaking-proxy benchmark\n" + subtitle, fontsize=13, y=0.995, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=2.5)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[3].strip())
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
