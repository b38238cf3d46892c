"""The benchmark's upstream: the lab's FaultyUpstream, configured from the command line.

    python -m benchmarks.bench_upstream --chunks 20 --chunk-delay 0.05 [--fail-rate 0.3] [--port 0]

Prints "bench upstream listening at 127.0.0.1:N" (a line the lab's harness reads as it reads mitmdump's) once it
accepts connections; SIGINT stops it. Chat completions asked for with "stream": true get `--chunks` SSE chunks
`--chunk-delay` seconds apart; other requests get the usual small JSON completion. With `--fail-rate`, that share of
attempts (seeded, so reproducible) is answered 503 instead. It runs as its own process so that its CPU is not counted
against the load generator or the proxy. FaultyUpstream is seaking/lab/fault_upstream.py's.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field

from seaking.lab.fault_upstream import FaultyUpstream, Good, Status, Stream, serve_until_stopped


@dataclass
class Sometimes:
    """Answer as `fault` with probability `chance`, else normally: a flaky upstream for load tests."""

    chance: float
    fault: object
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    async def __call__(self, request, received):
        chosen = self.fault if self.rng.random() < self.chance else Good()
        return await chosen(request, received)


@dataclass
class SlowStreams:
    """A good answer whose streams are `chunks` chunks `delay` seconds apart, like a model generating tokens."""

    chunks: list[str]
    delay: float

    async def __call__(self, request, received):
        if _asks_for_stream(received.body):
            return await Stream(chunks=self.chunks, delay=self.delay)(request, received)
        return await Good()(request, received)


class _NotKept(list):
    """FaultyUpstream records every request for tests; a benchmark sends tens of thousands and never reads them."""

    def append(self, item) -> None:
        pass


def _asks_for_stream(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and bool(document.get("stream"))


def build_upstream(chunks: int, chunk_delay: float, fail_rate: float) -> FaultyUpstream:
    upstream = FaultyUpstream()
    upstream.received = _NotKept()
    answer = SlowStreams([f" token{i}" for i in range(chunks)], chunk_delay)
    if fail_rate > 0:
        # Sometimes answers with Good() when it does not fail: the fault runs use non-streaming requests only.
        answer = Sometimes(fail_rate, Status(503))
    upstream.always("chat/completions", answer)
    return upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per streamed completion")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between streamed chunks")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of chat completions answered 503")
    args = parser.parse_args()
    serve_until_stopped(build_upstream(args.chunks, args.chunk_delay, args.fail_rate), args.port, "bench upstream")


if __name__ == "__main__":
    main()
