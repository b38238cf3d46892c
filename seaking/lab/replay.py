"""The replay lab: a recorded session reproduced offline, `python replay.py RECORDING [--config FILE]`.

A recording made through the proxy (`mitmweb -w session.mitm`, or mitmdump) holds each client flow and, beside it,
its attempt flows: what every upstream attempt sent and got back (seaking/attempt_flows.py). The lab
  1. serves the recorded attempts as the upstream with mitmproxy's own server replay: a `mitmdump -S` process with
     one reverse listener per upstream the recording talked to, and the recorded_faults.py script, which plays each
     attempt's timing and failure (reset, hang, a stream that broke off);
  2. runs the proxy (`mitmdump -s addon.py`) with the given config, its targets pointed at those listeners;
  3. sends the recorded client requests, one after the other, and reads the proxy's own recording of them;
  4. prints per request the recorded and the replayed attempt history and final status side by side.
Exit status: 0 when every request agrees, 1 when one does not, 2 when the recording cannot be used (with the reason).

Keys: a recording holds none (they are redacted), and the lab needs none: the fake upstream does not check them, so
the config's keys and access key are dropped for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import yaml
from mitmproxy import exceptions, http, io

from seaking.attempt_flows import tells_something
from seaking.config import ConfigError, parse_config
from seaking.flow_notes import counted_runs, describe_resume
from seaking.lab import recorded_faults
from seaking.lab.harness import Mitmdump, MitmdumpFailed, free_ports
from seaking.lab.recorded_faults import LAB_HEADER
from seaking.records import RECORD_KEY, AttemptFlowRecord, FlowRecord, is_attempt_flow

_NOT_RESENT = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "accept-encoding"})


class RecordingUnusable(Exception):
    """The recording cannot be replayed; the message says why."""


@dataclass
class RecordedRequest:
    flow: http.HTTPFlow  # the client's flow
    attempts: list[http.HTTPFlow]  # its attempt flows, in order

    @property
    def record(self) -> FlowRecord:
        return FlowRecord.from_metadata(self.flow.metadata[RECORD_KEY])

    @property
    def path(self) -> str:
        return self.record.client_path or self.flow.request.path


@dataclass
class Outcome:
    """What happened to one request, in terms both sides can be compared in."""

    attempts: list[tuple[str, str | None, str | None]]  # (label, target, model)
    status: int | None
    answered_by: str | None = None
    stream_error: str | None = None
    heartbeats: bool = False
    resumes: list[str] = field(default_factory=list)  # each break after content, and what became of the reply

    @classmethod
    def of(cls, record: FlowRecord, target_names: dict[str, str] | None = None) -> Outcome:
        names = target_names or {}
        attempts = [
            (f"continuation {a.label}" if a.continuation else a.label, names.get(a.target, a.target), a.model)
            for a in record.attempts
        ]
        answered_by = record.answered_by.value if record.answered_by else None
        resumes = [describe_resume(r) for r in record.resumes]
        return cls(attempts, record.status, answered_by, record.stream_error, record.heartbeats, resumes)

    def describe(self, several_targets: bool, several_models: bool) -> str:
        if not self.attempts:  # pragma: no cover - only a request the replaying proxy never recorded (below)
            return f"no attempts → {self.status}"
        labels = [
            " ".join([label] + ([str(target)] if several_targets else []) + ([str(model)] if several_models else []))
            for label, target, model in self.attempts
        ]
        end = f"{self.status}"
        if self.heartbeats:
            end += " (heartbeats first)"
        if self.answered_by and self.answered_by != "upstream":
            end += f" by {self.answered_by}"
        if self.resumes:
            end += ", " + ", ".join(self.resumes)
        if self.stream_error:
            end += f", stream ended with {self.stream_error}"
        return f"{', '.join(counted_runs(labels))} → {end}"


@dataclass
class Session:
    requests: list[RecordedRequest]
    origins: list[str] = field(default_factory=list)  # scheme://host:port of every upstream, in order of first use
    target_names: dict[str, str] = field(default_factory=dict)  # origin -> the record's name for it (host[:port])


def read_recording(path: Path) -> Session:
    """The client flows of a recording with their attempt flows; RecordingUnusable says why one cannot be used."""
    try:
        with open(path, "rb") as fh:
            flows = list(io.FlowReader(fh).stream())
    except OSError as e:
        raise RecordingUnusable(f"cannot read {path}: {e.strerror or e}") from None
    except exceptions.FlowReadException as e:
        raise RecordingUnusable(f"{path} is not a mitmproxy flow file: {e}") from None
    http_flows = [f for f in flows if isinstance(f, http.HTTPFlow)]
    # Each client flow's record names its attempt flows: a flow replayed in mitmweb while recording is in the file
    # twice, under one id, each time with attempt flows of its own.
    attempt_flows = {f.id: f for f in http_flows if is_attempt_flow(f)}
    exchanged = [f for f in http_flows if f.id not in attempt_flows and f.metadata.get(RECORD_KEY, {}).get("attempts")]
    if not exchanged:
        raise RecordingUnusable(
            f"{path} holds no flow that seaking-proxy sent upstream ({len(http_flows)} HTTP flows): record through "
            "the proxy, e.g. mitmweb -s addon.py -w session.mitm"
        )
    session = Session([])
    for flow in sorted(exchanged, key=lambda f: f.request.timestamp_start):
        record = FlowRecord.from_metadata(flow.metadata[RECORD_KEY])
        own = [attempt_flows.get(a.flow) for a in record.attempts]
        if own == [None] and not tells_something(record, 1):
            own = [answered_at_once(flow, record)]  # the proxy made no attempt flow: the client flow shows it all
        if None in own:
            raise RecordingUnusable(
                f"{flow.request.method} {flow.request.path} made {len(own)} attempts but the recording does not hold "
                "their attempt flows: record with attempt flows on (the default; --set seaking_attempt_flows=true)"
            )
        session.requests.append(RecordedRequest(flow, own))
        for attempt in own:
            origin = _origin(attempt.request.url)
            if origin not in session.origins:
                session.origins.append(origin)
                session.target_names[origin] = attempt.metadata[RECORD_KEY]["target"]
    return session


def answered_at_once(client: http.HTTPFlow, record: FlowRecord) -> http.HTTPFlow:
    """The attempt flow of a request answered well at its first attempt, which the proxy does not make: the client
    flow shows that exchange already (its URL is the upstream's, its response what the upstream sent; a stream's
    response is the copy the flow kept of it)."""
    attempt = client.copy()
    attempt.metadata[RECORD_KEY] = AttemptFlowRecord(client.id, 1, record.attempts[0]).to_metadata()
    return attempt


def lab_instructions(attempt: http.HTTPFlow, stream_error: str | None) -> dict:
    """How the fake upstream plays one recorded attempt: how long until it answers, and how it fails."""
    label = attempt.metadata[RECORD_KEY]["label"]
    started = attempt.request.timestamp_start
    if attempt.response is None:
        answered = attempt.error.timestamp if attempt.error else started
        fault = "hang" if label == "timeout" else "reset"
        return {"delay": 0 if fault == "hang" else round(max(0.0, answered - started), 3), "fault": fault}
    lab = {"delay": round(max(0.0, attempt.response.timestamp_start - started), 3)}
    if label == "timeout" or stream_error == "stream_idle_timeout":
        lab["fault"] = "stall"
    elif attempt.error is not None:
        lab["fault"] = "drop"
    return lab


def upstream_flows(session: Session, dead_ports: dict[str, int]) -> list[http.HTTPFlow]:
    """The recorded attempts as server replay serves them: addressed as requests to the lab's listeners arrive
    (each listener's reverse target is its own dead port), each answer carrying its lab instructions."""
    served = []
    for request in session.requests:
        for attempt in request.attempts:
            flow = attempt.copy()
            flow.request.scheme, flow.request.host = "http", "127.0.0.1"
            flow.request.port = dead_ports[_origin(attempt.request.url)]
            stream_error = attempt.metadata[RECORD_KEY].get("stream_error")
            if flow.response is None:
                flow.response = http.Response.make(502, b"", {})
            flow.response.headers[LAB_HEADER] = json.dumps(lab_instructions(attempt, stream_error))
            flow.error = None
            served.append(flow)
    return served


def lab_config(config_path: Path | None, listeners: dict[str, str], primary: str, cache_file: Path) -> dict:
    """The user's config with every target pointed at the lab's listeners, without keys, probes or a real cache."""
    config = {}
    if config_path is not None:
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecordingUnusable(f"cannot read the config {config_path}: {e}") from None
        if not isinstance(config, dict):
            raise RecordingUnusable(f"the config {config_path} is not a mapping")

    def lab_url(url: str) -> str:
        parts = urlsplit(url)
        listener = urlsplit(listeners.get(_origin(url), listeners[primary]))
        return urlunsplit((listener.scheme, listener.netloc, parts.path, parts.query, ""))

    target_proxy = dict(config.get("target_proxy") or {})
    if target_proxy.get("url"):
        target_proxy["url"] = lab_url(target_proxy["url"])
    target_proxy["api_key"] = None
    config["target_proxy"] = target_proxy
    config["targets"] = [{**t, "url": lab_url(t["url"]), "api_key": None} for t in config.get("targets") or []]
    config["server"] = {**(config.get("server") or {}), "access_key": None}
    config["models"] = {**(config.get("models") or {}), "cache_file": str(cache_file)}
    config["health_check"] = {**(config.get("health_check") or {}), "interval": 0}
    try:
        parse_config(config, environ=os.environ)  # here, where it can be said plainly: not as a replay that differs
    except ConfigError as e:
        raise RecordingUnusable(f"the config {config_path}: {e}") from None
    return config


def _origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    request: RecordedRequest
    recorded: Outcome
    replayed: Outcome

    @property
    def agrees(self) -> bool:
        return self.recorded == self.replayed


def lab_upstream(session: Session, workdir: Path) -> tuple[Mitmdump, dict[str, str]]:
    """The lab's upstream, not started: `mitmdump -S` serving the recorded attempts with recorded_faults.py, one
    reverse listener per upstream the recording talked to (each on a port of its own: mitmproxy refuses several on
    port 0), each reversing to a dead port of its own (what the recording does not answer is refused). It, and each
    origin's listener URL."""
    count = len(session.origins)
    ports = free_ports(2 * count)
    dead_ports = dict(zip(session.origins, ports[:count], strict=True))
    listen_ports = dict(zip(session.origins, ports[count:], strict=True))
    upstream_file = workdir / "upstream.mitm"
    with open(upstream_file, "wb") as fh:
        writer = io.FlowWriter(fh)
        for flow in upstream_flows(session, dead_ports):
            writer.add(flow)
    modes = [
        arg for origin in session.origins
        for arg in ("--mode", f"reverse:http://127.0.0.1:{dead_ports[origin]}@{listen_ports[origin]}")
    ]
    upstream = Mitmdump(
        *modes, "-S", str(upstream_file), "-s", recorded_faults.__file__,
        "--set", "connection_strategy=lazy", "--set", "keepserving=true", "--set", "server_replay_extra=kill",
        "--set", "flow_detail=0",
        addon=False,
    )
    return upstream, {origin: f"http://127.0.0.1:{port}" for origin, port in listen_ports.items()}


async def replay(recording: Path, config_path: Path | None, workdir: Path, request_timeout: float) -> list[Comparison]:
    session = read_recording(recording)
    upstream, listeners = lab_upstream(session, workdir)
    proxy = None
    try:
        await upstream.start(len(listeners))
        primary = _origin(session.requests[0].attempts[0].request.url)
        config_file = workdir / "lab-config.yaml"
        config_file.write_text(yaml.safe_dump(lab_config(config_path, listeners, primary, workdir / "models.json")))
        replayed_file = workdir / "replayed.mitm"
        proxy = Mitmdump(
            "--mode", f"reverse:{listeners[primary]}", "--set", f"seaking_config={config_file}", "-w", str(replayed_file),
            "--set", "flow_detail=0",
        )
        proxy_url = await proxy.start()
        await send_all(proxy_url, session.requests, request_timeout)
        await proxy.stop()
    except MitmdumpFailed as e:  # pragma: no cover - mitmdump that cannot start at all: a broken installation
        raise RecordingUnusable(str(e)) from None
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()
    names = {f"127.0.0.1:{urlsplit(url).port}": session.target_names[origin] for origin, url in listeners.items()}
    replayed = [f for f in read_flows(replayed_file) if not is_attempt_flow(f)]
    replayed.sort(key=lambda f: f.request.timestamp_start)
    comparisons = []
    for index, request in enumerate(session.requests):
        if index < len(replayed):
            outcome = Outcome.of(FlowRecord.from_metadata(replayed[index].metadata.get(RECORD_KEY, {})), names)
        else:  # pragma: no cover - the replaying proxy lost a request: a difference to show, not the lab's error
            outcome = Outcome([], None)
        comparisons.append(Comparison(request, Outcome.of(request.record), outcome))
    return comparisons


def read_flows(path: Path) -> list[http.HTTPFlow]:
    with open(path, "rb") as fh:
        return [f for f in io.FlowReader(fh).stream() if isinstance(f, http.HTTPFlow)]


async def send_all(proxy_url: str, requests: list[RecordedRequest], timeout: float) -> None:
    """The recorded client requests, one after the other, each read to its end (a stream too)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as client:
        for request in requests:
            recorded = request.flow.request
            headers = [(k, v) for k, v in recorded.headers.items(multi=True) if k.lower() not in _NOT_RESENT]
            try:
                async with client.request(
                    recorded.method, proxy_url + request.path, headers=headers, data=recorded.raw_content or None
                ) as response:
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):  # pragma: no cover - the proxy's answer is in its recording
                pass


def report(comparisons: list[Comparison], out=sys.stdout) -> bool:
    for number, c in enumerate(comparisons, 1):
        both = c.recorded.attempts + c.replayed.attempts
        several_targets = len({target for _, target, _ in both}) > 1
        several_models = len({model for _, _, model in both}) > 1
        print(f"{number}. {c.request.flow.request.method} {c.request.path}  [{'agree' if c.agrees else 'DIFFER'}]", file=out)
        print(f"   recorded: {c.recorded.describe(several_targets, several_models)}", file=out)
        print(f"   replayed: {c.replayed.describe(several_targets, several_models)}", file=out)
    differ = sum(not c.agrees for c in comparisons)
    print(f"{len(comparisons) - differ} of {len(comparisons)} requests agree", file=out)
    return differ == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replay.py", description="Reproduce a recorded seaking-proxy session offline and compare what happens."
    )
    parser.add_argument("recording", type=Path, help="a flow file recorded through the proxy (mitmweb/mitmdump -w)")
    parser.add_argument("--config", type=Path, help="the proxy's config file for the replay (default: the defaults)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for one request (default: 600)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="seaking-replay-") as workdir:
            comparisons = asyncio.run(replay(args.recording, args.config, Path(workdir), args.timeout))
    except RecordingUnusable as e:
        print(f"replay.py: cannot use this recording: {e}", file=sys.stderr)
        return 2
    return 0 if report(comparisons) else 1
