"""Bar charts of a benchmark run, one bar per way: the figures of docs/benchmark.md that matter most, as a PNG.

    python benchmarks/plot.py RAW.json OUT.png

RAW.json is the raw-results object bench.py writes ({"environment", "plan", "results", "ways", ...}). Needs matplotlib
(benchmarks/requirements.txt), which the project itself does not: bench.py runs this with whichever interpreter can
import it, and skips the plot with a note otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

COLOURS = {"direct": "#9e9e9e", "mitmdump": "#8da0cb", "mitmdump-stream": "#66c2a5", "seaking-proxy": "#e4572e",
           "litellm": "#7b3294"}
OTHER_COLOURS = ["#a6d854", "#ffd92f", "#e5c494", "#b3b3b3"]


def get(results: dict, way: str, run: str, key: str) -> float | None:
    return ((results.get(way) or {}).get(run) or {}).get(key)


def label(number: float | None) -> str:
    if number is None:
        return "n/a"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 10:
        return f"{number:.0f}"
    return f"{number:.1f}" if abs(number) >= 1 else f"{number:.2f}"


def plain(y: float, _pos=None) -> str:
    if y == 0:
        return "0"
    if abs(y) >= 1:
        return f"{y:,.0f}"
    return f"{y:g}"


def panel(ax, title: str, unit: str, groups: list[str], ways: list[str], values: dict[str, list[float | None]],
          scale: str = "linear", reference: tuple[float, str] | None = None, higher_is_better: bool = False,
          ylim: tuple[float, float] | None = None, decimals: int | None = None) -> None:
    """Grouped bars: one group per condition (1 client, 16 clients, ...), one bar per way within it."""
    shown = [w for w in ways if any(v is not None for v in values[w])]
    width = 0.8 / max(len(shown), 1)
    positive = [v for w in shown for v in values[w] if v is not None and v > 0]
    floor = min(positive) / 3 if positive else 1.0
    for i, way in enumerate(shown):
        xs = [g + (i - (len(shown) - 1) / 2) * width for g in range(len(groups))]
        raw = values[way]
        if scale == "log":
            heights = [max(v, floor) if v is not None else 0 for v in raw]
        else:
            heights = [v if v is not None else 0 for v in raw]
        bars = ax.bar(xs, heights, width * 0.92, color=colour(way, ways), label=way, edgecolor="white", linewidth=0.5)
        for bar, v in zip(bars, raw):
            y = bar.get_height()
            va = "bottom" if (v or 0) >= 0 else "top"
            text = label(v) if decimals is None or v is None else f"{v:.{decimals}f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, y), xytext=(0, 2 if va == "bottom" else -2),
                        textcoords="offset points", ha="center", va=va, fontsize=7.5)
    if scale == "log":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
    elif scale == "symlog":
        ax.set_yscale("symlog", linthresh=1)
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
    if reference:
        ax.axhline(reference[0], color="black", linewidth=0.8, linestyle="--", zorder=0)
    if ylim:
        ax.set_ylim(*ylim)
    else:
        low, high = ax.get_ylim()
        if scale == "log":
            low = floor / 1.5  # the smallest bar must stay visible
        ax.set_ylim(low, high * (3 if scale in ("log", "symlog") else 1.15))  # room for the value labels
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    better = "higher is better" if higher_is_better else "lower is better"
    notes = [better] + (["log scale"] if scale != "linear" else []) + ([reference[1]] if reference else [])
    ax.set_title(f"{title}\n({', '.join(notes)})", fontsize=10.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def colour(way: str, ways: list[str]) -> str:
    if way in COLOURS:
        return COLOURS[way]
    others = [w for w in ways if w not in COLOURS]
    return OTHER_COLOURS[others.index(way) % len(OTHER_COLOURS)]


def plot(raw: dict, out: Path) -> None:
    results, ways, plan, env = raw["results"], raw["ways"], raw["plan"], raw["environment"]
    chat_ns = [int(n) for n in plan["chat"]]
    stream_ns = [int(n) for n in plan["stream"]]
    proxies = [w for w in ways if w != "direct"]
    fail = f"{env['upstream']['fail_rate']:.0%}"

    def series(run: str, key: str, ns: list[int] | None = None, who: list[str] = ways) -> dict[str, list]:
        if ns is None:
            return {w: [get(results, w, run, key)] for w in who}
        return {w: [get(results, w, f"{run}_{n}", key) for n in ns] for w in who}

    def clients(n: int, noun: str) -> str:
        return f"{n} {noun}{'s' * (n > 1)}"

    fig, axes = plt.subplots(4, 2, figsize=(15, 18))
    chat_groups = [clients(n, "client") for n in chat_ns]
    stream_groups = [clients(n, "stream") for n in stream_ns]
    panel(axes[0][0], "Non-streaming chat: throughput", "successful requests / s", chat_groups, ways,
          series("chat", "rps", chat_ns), scale="log", higher_is_better=True)
    panel(axes[0][1], "Non-streaming chat: latency p50", "ms", chat_groups, ways,
          series("chat", "p50_ms", chat_ns), scale="log")
    panel(axes[1][0], "Streaming: time to first token, overhead over direct, p50", "ms", stream_groups, proxies,
          series("stream", "ttft_overhead_p50_ms", stream_ns, proxies), scale="symlog")
    panel(axes[1][1], "Streaming: time to first token, overhead over direct, p99", "ms", stream_groups, proxies,
          series("stream", "ttft_overhead_p99_ms", stream_ns, proxies), scale="symlog")
    spacing = env["upstream"]["chunk_delay_s"] * 1000
    panel(axes[2][0], "Streaming: gap between chunks, p99", "ms", stream_groups, ways,
          series("stream", "gap_p99_ms", stream_ns), scale="log",
          reference=(spacing, f"dashed: the upstream sends every {spacing:.0f} ms"))
    memory = {w: [get(results, w, "memory", "idle_rss_mib"), get(results, w, "memory", "peak_rss_mib")]
              for w in proxies}
    panel(axes[2][1], "Proxy resident memory", "MiB", ["idle after start-up", f"peak, {max(stream_ns)} streams"],
          proxies, memory)
    panel(axes[3][0], f"{fail} of attempts answered 503: success", "% of requests answered 200", [""], ways,
          series("faults", "success_pct"), higher_is_better=True, ylim=(0, 112), decimals=1)
    panel(axes[3][1], f"{fail} of attempts answered 503: latency p50 (all answers)", "ms", [""], ways,
          series("faults", "p50_ms"), scale="log")
    for ax in (axes[3][0], axes[3][1]):
        ax.set_xticks([])

    handles = [plt.Rectangle((0, 0), 1, 1, color=colour(w, ways)) for w in ways]
    fig.legend(handles, ways, loc="upper center", ncol=len(ways), fontsize=12, frameon=False,
               bbox_to_anchor=(0.5, 0.962))
    missing = [w for w in ways if not any(k.startswith(("chat_", "stream_")) for k in (results.get(w) or {}))]
    subtitle = (f"{env['date'][:10]}, {env['mode']} run, {env['cpus']} CPUs, loopback; upstream streams "
                f"{env['upstream']['stream_chunks']} chunks {spacing:.0f} ms apart")
    if missing:
        subtitle += f"; not measured: {', '.join(missing)}"
    fig.suptitle("seaking-proxy benchmark: one bar per way of reaching the same upstream\n" + subtitle,
                  fontsize=13, y=0.995, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.945), h_pad=2.5)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    raw = json.loads(Path(sys.argv[1]).read_text())
    plot(raw, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
