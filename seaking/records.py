"""What the proxy's addons tell each other about a flow, and what a recording keeps of it: the flow's record.

A client flow's record is a `FlowRecord`, written by the addons that decide things (AccessGuard, Exchange, the
stream answer, ModelsCache, AttemptFlows) and read by those that show or count them (FlowNotes, Metrics, the replay
lab). While the flow is live it is a typed object held by `Records`; when the flow ends, `Records` writes it into
`flow.metadata["seaking"]` as plain data — mitmproxy's own place for per-flow notes (proxyauth keeps its user there):
it travels with the flow, is saved in `-w` recordings and can be filtered with `~meta`. It never holds a key.

An attempt flow (one upstream attempt shown beside its client's flow, attempt_flows.py) carries an `AttemptFlowRecord`.
`from_metadata` reads records of recordings made by earlier versions too: unknown keys are ignored, missing ones take
their defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import weakref
from dataclasses import dataclass, field

from mitmproxy import http

from retry_policy import Failure, StopReason, Verdict

RECORD_KEY = "seaking"


class AnsweredBy(enum.Enum):
    """Who made the answer the client got."""

    UPSTREAM = "upstream"  # the upstream's own answer, passed on (a stream: its events)
    PROXY = "seaking-proxy"  # an error the proxy made after giving up, refusing, or shutting down
    MODELS_CACHE = "models cache"  # a /models list kept from an earlier good answer
    MODELS_FALLBACK = "models fallback"  # the config's models.fallback list


@dataclass
class AttemptRecord:
    """One upstream attempt, as plain data: what the client's record lists and its attempt flow repeats."""

    label: str  # the status, or what failed: "503", "timeout", "network", "200 (bad body)"
    verdict: Verdict
    status: int | None = None
    target: str | None = None  # host[:port]
    model: str | None = None
    failure: Failure | None = None
    detail: str = ""  # scrubbed of keys
    seconds: float = 0.0  # from sending to the verdict
    wait_before: float = 0.0  # since the attempt before it ended (back-off, Retry-After)
    flow: str | None = None  # the id of its attempt flow, where one was made
    continuation: int = 0  # which continuation of a broken-off reply it asked for (0: the request itself)
    hedged: bool = False  # it passed its per-try timeout and the next attempt started beside it
    prompt_tokens: int | None = None  # as the upstream reported them (a stream's: when it ended)
    completion_tokens: int | None = None

    def to_metadata(self) -> dict:
        return {
            "label": self.label,
            "status": self.status,
            "target": self.target,
            "model": self.model,
            "verdict": self.verdict.value,
            "failure": self.failure.value if self.failure else None,
            "detail": self.detail,
            "seconds": self.seconds,
            "wait_before": self.wait_before,
            **({"flow": self.flow} if self.flow else {}),
            **({"continuation": self.continuation} if self.continuation else {}),
            **({"hedged": True} if self.hedged else {}),
            **({"prompt_tokens": self.prompt_tokens} if self.prompt_tokens is not None else {}),
            **({"completion_tokens": self.completion_tokens} if self.completion_tokens is not None else {}),
        }

    @classmethod
    def from_metadata(cls, data: dict) -> AttemptRecord:
        return cls(
            label=data.get("label", "?"),
            verdict=Verdict(data.get("verdict", Verdict.RETRY.value)),
            status=data.get("status"),
            target=data.get("target"),
            model=data.get("model"),
            failure=Failure(data["failure"]) if data.get("failure") else None,
            detail=data.get("detail", ""),
            seconds=data.get("seconds", 0.0),
            wait_before=data.get("wait_before", 0.0),
            flow=data.get("flow"),
            continuation=data.get("continuation", 0),
            hedged=data.get("hedged", False),
            prompt_tokens=data.get("prompt_tokens"),
            completion_tokens=data.get("completion_tokens"),
        )


@dataclass
class ResumeRecord:
    """One time a stream broke off after content and the proxy tried to continue the reply (resume.py)."""

    after: str  # the error code of the break: stream_interrupted, stream_idle_timeout, stream_incomplete, ...
    at_chars: int  # characters of reply text the client had then
    outcome: ResumeOutcome
    detail: str = ""  # why not, when it was not continued

    def to_metadata(self) -> dict:
        data = {"after": self.after, "at_chars": self.at_chars, "outcome": self.outcome.value}
        return {**data, "detail": self.detail} if self.detail else data

    @classmethod
    def from_metadata(cls, data: dict) -> ResumeRecord:
        return cls(data.get("after", ""), data.get("at_chars", 0), ResumeOutcome(data.get("outcome", "failed")),
                   data.get("detail", ""))


class ResumeOutcome(enum.Enum):
    CONTINUED = "continued"  # a continuation's stream went on where the reply broke off
    FAILED = "failed"  # every continuation attempt failed
    REFUSED = "refused"  # the upstream refused the prefill (remembered for that target and model)
    NOT_POSSIBLE = "not_possible"  # nothing could continue it: tool calls, no target that takes a prefill, the budget


@dataclass
class FlowRecord:
    """A client flow's record. Each field is set by one addon (named), or stays at its default."""

    refused: str | None = None  # AccessGuard, GracefulShutdown: the error code of a request refused before its body
    endpoint: str | None = None  # Exchange: "chat/completions", "models", ... (None for other paths)
    client_path: str | None = None  # Exchange: the path as the client sent it (the flow's URL shows the upstream's)
    model: str | None = None  # AccessGuard: the JSON body's "model"
    stream: bool = False  # AccessGuard: the client asked for a stream ("stream": true)
    attempts: list[AttemptRecord] = field(default_factory=list)  # Exchange; AttemptFlows adds each one's flow id
    elapsed: float | None = None  # Exchange: seconds from the request to the answer (a stream: to its start)
    verdict: Verdict | None = None  # Exchange: the last attempt's verdict
    stopped: StopReason | None = None  # Exchange: why the attempts stopped
    answered_by: AnsweredBy | None = None  # Exchange; ModelsCache when it answered from the cache
    status: int | None = None  # Exchange, ModelsCache: the status the client got
    heartbeats: bool = False  # Exchange: a stream was answered 200 with heartbeats before the upstream answered
    stream_error: str | None = None  # the stream answer: the error code the stream was ended with
    reply_chars: int | None = None  # the stream answer: characters of reply text streamed to the client
    duration: float | None = None  # the stream answer: seconds from the request to the stream's last byte
    resumes: list[ResumeRecord] = field(default_factory=list)  # the stream answer: each break after content
    ended_early: str | None = None  # Exchange: the error code a request was answered with before its exchange ended

    @property
    def tokens(self) -> tuple[int, int] | None:
        """Prompt and completion tokens of all attempts, as the upstream reported them; None if none did."""
        reported = [a for a in self.attempts if a.prompt_tokens is not None or a.completion_tokens is not None]
        if not reported:
            return None
        return sum(a.prompt_tokens or 0 for a in reported), sum(a.completion_tokens or 0 for a in reported)

    @property
    def gave_up(self) -> bool:
        """Every attempt failed and the proxy answered with why."""
        return self.verdict is Verdict.RETRY and self.answered_by is AnsweredBy.PROXY

    def to_metadata(self) -> dict:
        """Plain data for flow.metadata; fields at their defaults are left out."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == _default(f):
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            elif f.name in ("attempts", "resumes"):
                value = [a.to_metadata() for a in value]
            data[f.name] = value
        return data

    @classmethod
    def from_metadata(cls, data: dict) -> FlowRecord:
        record = cls()
        for f in dataclasses.fields(cls):
            if f.name not in data or data[f.name] is None:
                continue
            value = data[f.name]
            setattr(record, f.name, _PARSERS.get(f.name, lambda v: v)(value))
        return record


_PARSERS = {
    "attempts": lambda items: [AttemptRecord.from_metadata(a) for a in items],
    "resumes": lambda items: [ResumeRecord.from_metadata(r) for r in items],
    "verdict": Verdict,
    "stopped": StopReason,
    "answered_by": AnsweredBy,
}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class AttemptFlowRecord:
    """The record of an attempt flow: which client flow it belongs to, its number there, and the attempt."""

    attempt_of: str  # the client flow's id
    number: int  # 1 = the first attempt
    attempt: AttemptRecord
    stream_error: str | None = None  # the relayed stream's ending, on the attempt whose stream reached the client

    def to_metadata(self) -> dict:
        data = {"attempt_of": self.attempt_of, "attempt": self.number, **self.attempt.to_metadata()}
        if self.stream_error:
            data["stream_error"] = self.stream_error
        return data


def is_attempt_flow(flow: http.HTTPFlow) -> bool:
    return "attempt_of" in flow.metadata.get(RECORD_KEY, {})


class Records:
    """mitmproxy addon, last in the pipeline: the typed record of each client flow while it is live, written into
    flow.metadata when it ends (before mitmproxy's recorder, which runs after the script's addons, saves it)."""

    name = "seaking.records"

    def __init__(self) -> None:
        # Weakly held: a flow that is gone takes its record with it, however it ended.
        self._records: weakref.WeakKeyDictionary[http.HTTPFlow, FlowRecord] = weakref.WeakKeyDictionary()

    def of(self, flow: http.HTTPFlow) -> FlowRecord:
        """The flow's record (for a flow met first here: the one its metadata holds, or a new one)."""
        record = self._records.get(flow)
        if record is None:
            record = self._records[flow] = FlowRecord.from_metadata(flow.metadata.get(RECORD_KEY) or {})
        return record

    def is_answered(self, flow: http.HTTPFlow) -> bool:
        """Whether an earlier addon has answered the flow (or refused it before its body was read)."""
        record = self._records.get(flow)
        return flow.response is not None or (record is not None and record.refused is not None)

    def peek(self, flow: http.HTTPFlow) -> FlowRecord | None:
        """The record, if any addon has written one."""
        return self._records.get(flow)

    def restart(self, flow: http.HTTPFlow) -> FlowRecord:
        """A fresh record for a flow that is run again (mitmweb's Replay)."""
        flow.metadata.pop(RECORD_KEY, None)
        record = self._records[flow] = FlowRecord()
        return record

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def _write(self, flow: http.HTTPFlow) -> None:
        record = self._records.get(flow)
        if record is not None:
            flow.metadata[RECORD_KEY] = record.to_metadata()
