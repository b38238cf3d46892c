"""Record the sessions in tests/flows/: a real SillyTavern 1.19 talks through the proxy (`mitmdump -w`) to the fault
upstream, which fails as each scenario says. tests/test_replay_lab.py replays every recording there with the replay lab.

    .venv/bin/python tests/record_flows.py              # every scenario
    .venv/bin/python tests/record_flows.py NAME ...     # some (names as in tests/flows/, without .mitm)

To add one: write a scenario below (script the upstream, then do what a SillyTavern user does), run this with its
name, and commit tests/flows/NAME.mitm. The recordings hold no key (the proxy redacts them), and are a few kB each.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]  # as pytest.ini's

from seaking.lab.fault_upstream import Delayed, FaultyUpstream, MessageStream, Status, Stream, split_words  # noqa: E402
from seaking.lab.harness import Mitmdump  # noqa: E402
from sillytavern import SillyTavern  # noqa: E402

FLOWS = Path(__file__).resolve().parent / "flows"
CONFIG = FLOWS / "config.yaml"
ST_KEY = "sk-st-recorded-session-key"  # stored in SillyTavern; never in a recording
SCENARIOS = {}


def scenario(function):
    SCENARIOS[function.__name__.replace("_", "-")] = function
    return function


@scenario
async def retry_503_twice(st, upstream, custom_url):
    upstream.script("chat/completions", Status(503), Status(503))
    return await st.generate(custom_url)


@scenario
async def retry_503_twice_stream(st, upstream, custom_url):
    upstream.script("chat/completions", Status(503), Status(503))
    return await st.generate(custom_url, stream=True)


@scenario
async def mid_stream_drop(st, upstream, custom_url):
    upstream.script("chat/completions", Stream(chunks=["Once", " upon", " a", " time"], delay=0.05, drop_after=2))
    return await st.generate(custom_url, stream=True)


@scenario
async def unauthorized_401(st, upstream, custom_url):
    upstream.script("chat/completions", Status(401, body={"error": {"message": "Incorrect API key provided"}}))
    return await st.generate(custom_url, stream=True)


@scenario
async def models_outage_from_cache(st, upstream, custom_url):
    first = await st.list_models(custom_url)  # "Connect" while the upstream is up: the list is cached
    upstream.always("models", Status(503))
    return first, await st.list_models(custom_url)  # "Connect" again during the outage


@scenario
async def claude_drop_resumed(st, upstream, custom_url):
    """The Claude source: the stream drops after five words, and the proxy continues the reply (a prefill)."""
    words = split_words("Once upon a time a fox lived at the edge of a wood, and every morning it ran to the river.")
    upstream.script("messages", MessageStream(chunks=words, delay=0.05, drop_after=5), MessageStream(chunks=words, delay=0.05))
    return await st.generate_claude(custom_url, "recorded-session-proxy-password", stream=True)


@scenario
async def slow_upstream_heartbeats(st, upstream, custom_url):
    upstream.script("chat/completions", Delayed(1.5, then=Stream()))  # three heartbeat intervals before headers
    return await st.generate(custom_url, stream=True)


async def record(names: list[str], workdir: Path) -> None:
    async with SillyTavern(workdir / "sillytavern") as st:
        await st.store_key(ST_KEY)
        for name in names:
            upstream = FaultyUpstream()
            await upstream.start()
            recording = workdir / f"{name}.mitm"
            proxy = Mitmdump(
                "--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={CONFIG}", "-w", str(recording),
                env={"XDG_CACHE_HOME": str(workdir / name)},  # a models cache of its own
            )
            try:
                url = await proxy.start()
                result = await SCENARIOS[name](st, upstream, url + "/v1")
            finally:
                await proxy.stop()
                await upstream.stop()
            shutil.copy(recording, FLOWS / recording.name)
            print(f"{name}: {str(result)[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"scenarios to record (default: all): {', '.join(SCENARIOS)}")
    names = parser.parse_args().names or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"no such scenario: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="seaking-record-") as workdir:
        asyncio.run(record(names, Path(workdir)))


if __name__ == "__main__":
    main()
