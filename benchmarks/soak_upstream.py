"""The chaos soak's upstream, and the recipes both sides of the soak read: what each request meets and should come to.

    python -m benchmarks.soak_upstream --port 9000 [--name A]

A FaultyUpstream (seaking/lab/fault_upstream.py) as a process of its own, so that the soak can kill it with SIGKILL and
start it again on the same port. Prints "soak upstream A listening at 127.0.0.1:9000"; SIGINT stops it.

Every request the soak sends names its case in its first message (`CASE: <case>`, as the lab's per-case scripts do).
`recipe(case)` turns the case id into everything about it, the same in every process (random.Random seeded with the
id): its dialect (OpenAI chat or Anthropic Messages), the reply's words and pace, the fault, and whether and where the
client leaves. The soak's client reads it to know the whole reply it should get; this server reads it to answer. A
recipe's faults answer the first requests of the case that reach *this* process (the first attempt, a retry, a hedge,
a continuation: whichever comes), then the good reply answers the rest; each process counts for itself, and a
restarted process counts from zero again. As with the lab's streams, a continuation request (a trailing assistant
message with a start of the reply) is answered with the rest of the reply, and a recipe's streaming faults apply to
it too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from seaking.lab.fault_upstream import (
    Blank,
    Delayed,
    Empty,
    ErrorBody,
    FaultyUpstream,
    Hang,
    Malformed,
    MessageStream,
    PrefillRefused,
    Received,
    Reset,
    Status,
    Stream,
    assistant_start,
    continued,
    serve_until_stopped,
    message,
    named,
    split_words,
)

OPENAI, ANTHROPIC = "openai", "anthropic"
ANTHROPIC_SHARE = 0.25  # of the requests: SillyTavern's Claude source; the rest its Custom (OpenAI-compatible) one
LEAVE_SHARE = 0.1  # of the requests: the client leaves at a random point (closes the connection)
WORDS_PER_REPLY = (20, 60)
SECONDS_PER_WORD = (0.01, 0.04)
# Words of at least four letters, numbered: every word of a reply differs from every other, so a piece sent twice or
# left out shows, and a restated seam of three words is always longer than 12 characters (the proxy's rule).
VOCABULARY = (
    "amber", "breeze", "candle", "dawn", "ember", "forest", "glimmer", "harbor", "island", "jasmine", "kettle",
    "lantern", "meadow", "night", "orchard", "pebble", "quiet", "river", "shadow", "thunder", "umbra", "velvet",
    "willow", "yonder", "zephyr", "across", "beyond", "slowly", "softly", "under", "above", "while",
)
NO_PREFILL_MODEL = "model-noprefill"  # the model whose upstream refuses continuations (remembered per target, model)


@dataclass(frozen=True)
class Recipe:
    """One request of the soak: what it asks, what its upstreams do, and what its client does."""

    case: str
    api: str  # OPENAI or ANTHROPIC
    kind: str  # the fault's name (a key of KINDS[api])
    chunks: tuple[str, ...]  # the whole reply, as the upstream streams it
    delay: float  # seconds between chunks
    model: str = "model-a"
    restate: int = 0  # a continuation begins with the last words of its start (the proxy removes them)
    tool: bool = False  # the reply is a tool call's arguments (never continued)
    usage: bool = False  # OpenAI: a usage chunk at the end (the client asks for it)
    first: tuple = ()  # the answers of this case's first requests at each upstream process
    then: object | None = None  # the answer once they are used up; None: the good stream
    refuse_prefill: bool = False  # every continuation request is answered 400 "no prefill"
    leave: tuple[str, float] | None = None  # ("events", n): after n content events; ("seconds", s): after s s

    @property
    def whole(self) -> str:
        return "".join(self.chunks)

    def stream(self, chunks: list[str] | None = None, **faults) -> Stream | MessageStream:
        """This recipe's stream in its dialect, with `faults` (Stream's or MessageStream's keywords)."""
        chunks = list(self.chunks) if chunks is None else chunks
        if self.api == ANTHROPIC:
            return MessageStream(chunks=chunks, delay=self.delay, restate=self.restate, tool_use=self.tool, **faults)
        return Stream(chunks=chunks, delay=self.delay, restate=self.restate, tool_call=self.tool, usage=self.usage,
                      **faults)

    def answer(self, number: int) -> Callable:
        """The answer to the `number`-th request of this case (0: the first) reaching one upstream process."""
        if number < len(self.first):
            return self.first[number]
        return self.then if self.then is not None else self.stream()

    def at(self, rng: random.Random) -> int:
        """A chunk to break a stream at: past a whole restatement plus one word (a continuation that breaks inside
        the words it restates is a case of its own, not this soak's), and before the reply's last word."""
        return rng.randint(max(3, self.restate + 2), len(self.chunks) - 2)


@dataclass
class Rest:
    """A stream of the rest of the reply (the whole reply, or after a continuation's start) cut to its first `keep`
    chunks, with `faults`: an early end that cuts a continuation as it would a first reply."""

    recipe: Recipe
    keep: int
    faults: dict = field(default_factory=dict)

    async def __call__(self, request, received: Received):
        rest = continued(list(self.recipe.chunks), received, self.recipe.restate)
        # The rest is all this stream says: the request it answers is shown to it without the continuation's start.
        return await self.recipe.stream(rest[: self.keep], **self.faults)(request, _without_start(received))


@dataclass
class EndsMidReply:
    """Anthropic: the body ends cleanly after the first `keep` text deltas of the rest of the reply, with no
    content_block_stop, message_delta or message_stop (a server that closed the stream mid-reply; MessageStream's
    `no_stop` still sends the first two)."""

    recipe: Recipe
    keep: int

    async def __call__(self, request, received: Received):
        rest = continued(list(self.recipe.chunks), received, self.recipe.restate)[: self.keep]
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        start = {**message("", self.recipe.model), "content": [], "stop_reason": None,
                 "usage": {"input_tokens": 5, "output_tokens": 1}}
        await response.write(named("message_start", {"type": "message_start", "message": start}))
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        await response.write(named("content_block_start", block))
        for index, text in enumerate(rest):
            if index:
                await asyncio.sleep(self.recipe.delay)
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            await response.write(named("content_block_delta", delta))
        await response.write_eof()
        return response


def _without_start(received: Received) -> Received:
    try:
        document = json.loads(received.body)
    except ValueError:
        return received
    messages = document.get("messages") if isinstance(document, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        document = {**document, "messages": messages[:-1]}
    return dataclasses.replace(received, body=json.dumps(document).encode())


def _unrestated(fault):
    """The same answer without a restatement at the start of a continuation."""
    if isinstance(fault, (Stream, MessageStream)):
        return dataclasses.replace(fault, restate=0)
    if isinstance(fault, Delayed):
        return dataclasses.replace(fault, then=_unrestated(fault.then))
    if isinstance(fault, (Rest, EndsMidReply)):
        return dataclasses.replace(fault, recipe=dataclasses.replace(fault.recipe, restate=0))
    return fault


# --- the catalogue: each kind of request, for each dialect --------------------------------------------------------
# A builder takes the recipe so far (dialect, words, pace, restatement) and the case's RNG, and sets what its upstreams
# do. Every outcome the proxy promises is allowed (a whole reply, or a clean error); what a kind *should* mostly come
# to is in the report's table by kind.

Builder = Callable[[Recipe, random.Random], Recipe]


def _good(r, rng):
    return r


def _usage(r, rng):
    return dataclasses.replace(r, usage=True)


def _tool(r, rng):
    return dataclasses.replace(r, tool=True, restate=0)


def _tool_drop(r, rng):
    r = dataclasses.replace(r, tool=True, restate=0)
    return dataclasses.replace(r, first=(r.stream(drop_after=r.at(rng)),))


def _status(codes):
    def build(r, rng):
        return dataclasses.replace(r, first=(Status(rng.choice(codes)),) * rng.randint(1, 2))
    return build


def _retry_after(r, rng):
    return dataclasses.replace(r, first=(Status(429, headers={"Retry-After": "1"}),))


def _retry_after_long(r, rng):
    return dataclasses.replace(r, first=(Status(429, headers={"Retry-After": "3600"}),))


def _fail_fast(r, rng):
    code = rng.choice((400, 401, 403))
    body = rng.choice((None, "<html><head><title>Bad request</title></head><body>nope</body></html>"))
    return dataclasses.replace(r, then=Status(code, body=body))


def _passed_on(r, rng):
    return dataclasses.replace(r, then=Status(rng.choice((404, 422))))


def _html_502(r, rng):
    return dataclasses.replace(r, then=Status(502, body="<html><body><h1>502 Bad Gateway</h1></body></html>"))


def _reset(r, rng):
    return dataclasses.replace(r, first=(Reset(),) * rng.randint(1, 2))


def _hang(r, rng):
    return dataclasses.replace(r, first=(Hang(),))


def _slow_headers(r, rng):
    return dataclasses.replace(r, first=(Delayed(rng.uniform(0.5, 4.0), then=r.stream()),))


def _once(fault):
    def build(r, rng):
        return dataclasses.replace(r, first=(fault,))
    return build


def _blank_always(r, rng):
    return dataclasses.replace(r, then=Blank())


def _error_first(r, rng):
    return dataclasses.replace(r, first=(r.stream(error_first="provider overloaded"),))


def _late_first_event(r, rng):
    return dataclasses.replace(r, first=(r.stream(first_event_after=rng.uniform(0.5, 5.0)),))


def _think(r, rng):
    return dataclasses.replace(
        r, first=(r.stream(think=rng.uniform(0.5, 5.0), ping_every=rng.choice((None, 0.5))),)
    )


def _drop(r, rng):
    return dataclasses.replace(r, first=(r.stream(drop_after=r.at(rng)),))


def _drop_twice(r, rng):
    return dataclasses.replace(r, first=(r.stream(drop_after=r.at(rng)), r.stream(drop_after=r.at(rng))))


def _stall(r, rng):
    return dataclasses.replace(r, first=(r.stream(stall_after=r.at(rng)),))


def _stall_then_drop(r, rng):
    return dataclasses.replace(r, first=(r.stream(stall_after=r.at(rng)), r.stream(drop_after=r.at(rng))))


def _early_end(r, rng):
    """The body ends cleanly after some words, without the stream's end ([DONE] and finish_reason; Anthropic:
    content_block_stop, message_delta and message_stop)."""
    if r.api == ANTHROPIC:
        return dataclasses.replace(r, first=(EndsMidReply(r, r.at(rng)),))
    return dataclasses.replace(r, first=(Rest(r, r.at(rng), {"no_done": True, "finish_reason": None}),))


def _complete_no_end(r, rng):
    """The whole text, then the end of the body without the stream's own end (OpenAI: no finish_reason, no [DONE];
    Anthropic: message_delta with its stop_reason, then no message_stop): a continuation has nothing to add."""
    faults = {"no_stop": True} if r.api == ANTHROPIC else {"no_done": True, "finish_reason": None}
    return dataclasses.replace(r, first=(r.stream(**faults),))


def _no_done(r, rng):
    return dataclasses.replace(r, first=(r.stream(no_done=True),))


def _no_finish_reason(r, rng):
    return dataclasses.replace(r, first=(r.stream(finish_reason=None),))


def _error_after(r, rng):
    return dataclasses.replace(r, first=(r.stream(error_after=r.at(rng)),))


def _prefill_refused(r, rng):
    return dataclasses.replace(r, model=NO_PREFILL_MODEL, first=(r.stream(drop_after=r.at(rng)),), refuse_prefill=True)


COMMON: dict[str, tuple[float, Builder]] = {
    "good": (12, _good),
    "tool call": (2, _tool),
    "tool call, drop": (2, _tool_drop),
    "retry-after 1 s": (2, _retry_after),
    "retry-after 1 h": (1, _retry_after_long),
    "fail-fast 4xx": (2, _fail_fast),
    "404/422 passed on": (1, _passed_on),
    "HTML 502 always": (1, _html_502),
    "reset": (4, _reset),
    "hang": (3, _hang),
    "slow headers": (3, _slow_headers),
    "empty body": (2, _once(Empty())),
    "malformed body": (2, _once(Malformed())),
    "error body": (2, _once(ErrorBody())),
    "blank": (3, _once(Blank())),
    "blank always": (1, _blank_always),
    "error first": (3, _error_first),
    "drop": (8, _drop),
    "drop twice": (3, _drop_twice),
    "stall": (6, _stall),
    "stall, drop": (2, _stall_then_drop),
    "early end": (4, _early_end),
    "complete, no end": (1, _complete_no_end),
    "prefill refused": (2, _prefill_refused),
}
KINDS: dict[str, dict[str, tuple[float, Builder]]] = {
    OPENAI: {
        **COMMON,
        "status 5xx/429": (6, _status((429, 500, 502, 503, 504, 520))),
        "usage chunk": (3, _usage),
        "late first event": (3, _late_first_event),
        "no [DONE]": (2, _no_done),
        "no finish_reason": (1, _no_finish_reason),
    },
    ANTHROPIC: {
        **COMMON,
        "status 529/5xx/429": (6, _status((429, 500, 503, 529))),
        "thinking (pings or not)": (3, _think),
        "error event mid-stream": (4, _error_after),
    },
}


@functools.lru_cache(maxsize=8192)
def recipe(case: str) -> Recipe:
    """Everything about the request named `case`: the same in every process."""
    rng = random.Random(case)
    api = ANTHROPIC if rng.random() < ANTHROPIC_SHARE else OPENAI
    kinds = KINDS[api]
    kind = rng.choices(list(kinds), weights=[weight for weight, _ in kinds.values()])[0]
    count = rng.randint(*WORDS_PER_REPLY)
    chunks = tuple(split_words(" ".join(f"{rng.choice(VOCABULARY)}{i}" for i in range(count))))
    pace = round(rng.uniform(*SECONDS_PER_WORD), 3)
    base = Recipe(case, api, kind, chunks, pace, restate=rng.choice((0, 0, 3, 4, 5)))
    built = kinds[kind][1](base, rng)
    if rng.random() < LEAVE_SHARE:
        leave = ("events", rng.randint(1, count)) if rng.random() < 0.6 else ("seconds", round(rng.uniform(0, 4), 2))
        built = dataclasses.replace(built, leave=leave)
    return built


# --- the server --------------------------------------------------------------------------------------------------


class SoakUpstream(FaultyUpstream):
    """Answers each request as its case's recipe says (requests without a case, e.g. health checks: normally)."""

    REMEMBERED = 50_000  # cases whose request count is kept (the oldest are forgotten)

    def __init__(self, trace: bool = False) -> None:
        super().__init__(keep_received=False)  # a soak sends hundreds of thousands, and never reads them
        self.trace = trace  # a line per request of a case: which request of it, and the answer's kind
        self._seen: OrderedDict[str, int] = OrderedDict()

    def _fault_for(self, path: str, case: str | None):
        if case is None or not path.rstrip("/").endswith(("/chat/completions", "/messages")):
            return super()._fault_for(path, case)
        number = self._seen.pop(case, 0)
        self._seen[case] = number + 1
        while len(self._seen) > self.REMEMBERED:
            self._seen.popitem(last=False)
        found = recipe(case)

        async def answer(request, received):
            start = assistant_start(received)  # the soak's requests end with the user's message
            fault = found.answer(number)
            if start is not None and found.refuse_prefill:
                fault = PrefillRefused()
            elif start is not None and len(start.split()) < 3:
                # A restatement of fewer than three words is kept by the proxy, by design (docs/streaming.md, "The
                # seam"): a break that early (an upstream killed after a word or two) gets no restatement here.
                fault = _unrestated(fault)
            if self.trace:
                what = "request" if start is None else f"continuation of {len(start)} chars"
                print(f"{case} #{number} {what}: {type(fault).__name__}", flush=True)
            return await fault(request, received)

        return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="A")
    parser.add_argument("--trace", action="store_true", help="print a line for each request of a case")
    arguments = parser.parse_args()
    serve_until_stopped(SoakUpstream(arguments.trace), arguments.port, f"soak upstream {arguments.name}")


if __name__ == "__main__":
    main()
