"""The chaos soak's chart: requests by outcome per minute, and the proxy's RSS and open files over the run.

    python -m benchmarks.soak_plot SOAK.json OUT.png

SOAK.json is what `python -m benchmarks.soak --out X.md` writes beside X.md. Needs matplotlib
(benchmarks/requirements.txt), which the project itself does not: soak.py runs this with whichever Python can import
it, and skips the plot with a note otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here
import matplotlib.pyplot as plt  # noqa: E402

OUTCOMES = (("whole", "whole", "#4caf50"), ("clean_errors", "clean error", "#ffb300"), ("left", "left", "#90a4ae"),
            ("anything_else", "anything else", "#d32f2f"))


def draw(data: dict, png: Path) -> None:
    minutes = data["minutes"]
    samples = data["samples"]
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    env = data["environment"]
    figure.suptitle(f"Chaos soak: {env['streams']} streams, {env['minutes']} min, seed {env['seed']} "
                    f"({'passed' if data['verdict']['passed'] else 'not passed'})")
    centres = [m["minute"] - 0.5 for m in minutes]
    bottoms = [0] * len(minutes)
    for key, label, colour in OUTCOMES:
        heights = [m[key] / 60 for m in minutes]
        top.bar(centres, heights, 0.8, bottom=bottoms, label=label, color=colour)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for centre, height, m in zip(centres, bottoms, minutes, strict=True):
        if m["anything_else"]:
            top.annotate(f"{m['anything_else']} else", (centre, height), xytext=(0, 2), textcoords="offset points",
                         ha="center", va="bottom", fontsize=8, color="#d32f2f")
    top.set_ylabel("requests/s begun, by outcome")
    top.legend(loc="lower right", fontsize=8)
    top.grid(axis="y", alpha=0.3)
    times = [s[0] / 60 for s in samples]
    middle.plot(times, [s[1] for s in samples], color="#e4572e", linewidth=1)
    middle.set_ylabel("proxy RSS (MiB)")
    middle.set_ylim(bottom=0)
    middle.grid(alpha=0.3)
    bottom.plot(times, [s[2] for s in samples], color="#3f51b5", linewidth=1)
    bottom.set_ylabel("proxy open files")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("minutes (dashed: an upstream killed; dotted: a config reload)")
    bottom.grid(alpha=0.3)
    for event in data["events"]:
        style = "--" if "killed" in event["what"] else ":" if "config" in event["what"] else None
        if style:
            for ax in (top, middle, bottom):
                ax.axvline(event["t"] / 60, linestyle=style, color="#757575", linewidth=0.7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
